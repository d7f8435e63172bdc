"""Translates one of the library's sources into host C++ for the warp emulator (warp_emulator.h).

    translate.py csrc/<op>/<op>_cuda.cu OUT.cpp     inline PTX -> emu:: calls, `extern __shared__` -> the
                                                   emulator's dynamic shared memory, kernel<<<...>>>(args)
                                                   -> emu::launch(...)
    translate.py csrc/<op>/<op>_torch.cpp OUT.cpp   the op's CUDA path serves CPU tensors: is_cuda() ->
                                                   is_cpu(), no device guard or stream, and the CUDA
                                                   implementation registered for the CPU dispatch key

A PTX instruction the emulator does not know stops the translation with its name.
"""
import re
import sys
from pathlib import Path


def match_close(s, i, open_ch, close_ch):
    """Index just past the bracket closing the one at s[i]."""
    depth = 0
    j = i
    in_str = False
    while j < len(s):
        c = s[j]
        if in_str:
            if c == "\\":
                j += 1
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c == open_ch:
            depth += 1
        elif c == close_ch:
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    raise ValueError("unbalanced")


def split_top(s, sep):
    """s split at the separators outside brackets and string literals."""
    parts, depth, cur, in_str, i = [], 0, "", False, 0
    while i < len(s):
        c = s[i]
        if in_str:
            cur += c
            if c == "\\":
                cur += s[i + 1]
                i += 1
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
            cur += c
        elif c in "([{":
            depth += 1
            cur += c
        elif c in ")]}":
            depth -= 1
            cur += c
        elif c == sep and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += c
        i += 1
    parts.append(cur)
    return parts


def operand_exprs(section):
    """The C++ expressions of an asm operand list such as `"=r"(x), "l"(ptr)`."""
    out = []
    for part in split_top(section, ","):
        part = part.strip()
        if not part:
            continue
        m = re.match(r'"[^"]*"\s*\((.*)\)$', part, re.S)
        assert m, part
        out.append(m.group(1).strip())
    return out


# The PTX the kernels use (whitespace removed) -> (outputs, inputs, emulator call from the operand expressions).
PTX = [
    (r"ex2\.approx\.ftz\.f32%0,%1;?", 1, 1, lambda o, i, m: f"{o[0]} = exp2f({i[0]})"),
    (r"cp\.async\.cg\.shared\.global\[%0\],\[%1\],16,%2;?", 0, 3,
     lambda o, i, m: f"::emu::cp_async({i[0]}, {i[1]}, {i[2]})"),
    (r"cp\.async\.commit_group;?", 0, 0, lambda o, i, m: "::emu::cp_async_commit()"),
    (r"cp\.async\.wait_group%0;?", 0, 1, lambda o, i, m: f"::emu::cp_async_wait({i[0]})"),
    (r"ldmatrix\.sync\.aligned\.m8n8\.x4(\.trans)?\.shared\.b16\{%0,%1,%2,%3\},\[%4\];?", 4, 1,
     lambda o, i, m: f"::emu::ldmatrix_x4({'true' if m.group(1) else 'false'}, {', '.join(o)}, {i[0]})"),
    (r"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.(bf16|f16)\.\1\.f32"
     r"\{%0,%1,%2,%3\},\{%4,%5,%6,%7\},\{%8,%9\},\{%0,%1,%2,%3\};?", 4, 6,
     lambda o, i, m: f"::emu::mma_m16n8k16(::emu::MmaType::{'kBf16' if m.group(1) == 'bf16' else 'kF16'}, "
                     f"{', '.join(o)}, {', '.join(i)})"),
]


def translate_asm(body):
    """The emulator call for the inside of one asm(...) statement."""
    sections = split_top(body, ":")
    template = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', sections[0]))
    o = operand_exprs(sections[1]) if len(sections) > 1 else []
    i = operand_exprs(sections[2]) if len(sections) > 2 else []
    compact = re.sub(r"\s|\\n", "", template)
    for pattern, n_out, n_in, call in PTX:
        m = re.fullmatch(pattern, compact)
        if m and (len(o), len(i)) == (n_out, n_in):
            return call(o, i, m)
    raise SystemExit(f"translate.py: no emulation for the PTX '{template}' with {len(o)} outputs and {len(i)} "
                     "inputs (add it to PTX here and to warp_emulator.cpp)")


def kernel_name_start(src, end):
    """Where the kernel expression ending at src[end] (a name, maybe with a template argument list) starts."""
    k = end
    while src[k - 1].isspace():
        k -= 1
    if src[k - 1] == ">":
        depth = 0
        while True:
            k -= 1
            depth += {">": 1, "<": -1}.get(src[k], 0)
            if depth == 0:
                break
    while src[k - 1].isalnum() or src[k - 1] in "_:":
        k -= 1
    return k


def translate_cu(src):
    # Inline PTX.
    out, pos = "", 0
    for m in re.finditer(r"\b(?:asm|__asm__)\s*(?:volatile\s*|__volatile__\s*)?\(", src):
        if m.start() < pos:
            continue
        start = m.end() - 1
        end = match_close(src, start, "(", ")")
        out += src[pos:m.start()] + translate_asm(src[start + 1:end - 1])
        pos = end
    src = out + src[pos:]
    # Dynamic shared memory.
    src = re.sub(r"extern __shared__ (?:__align__\(\d+\) )?([\w:<> ]+?) (\w+)\[\];",
                 r"\1* \2 = reinterpret_cast<\1*>(::emu::dynamic_smem());", src)
    # Launches.
    out, pos = "", 0
    for m in re.finditer(r"<<<", src):
        if m.start() < pos:
            continue
        k = kernel_name_start(src, m.start())
        name = src[k:m.start()].strip()
        cfg_end = src.index(">>>", m.end())
        cfg = [c.strip() for c in split_top(src[m.end():cfg_end], ",")]
        args_start = cfg_end + 3
        assert src[args_start] == "(", src[args_start:args_start + 20]
        args_end = match_close(src, args_start, "(", ")")
        args = src[args_start + 1:args_end - 1]
        smem = cfg[2] if len(cfg) > 2 else "0"
        # The arguments are evaluated once, at the launch, as on a GPU.
        out += (src[pos:k] + f"::emu::launch(dim3({cfg[0]}), dim3({cfg[1]}), size_t({smem}), "
                f"[emu_args = std::make_tuple({args})]() {{ std::apply({name}, emu_args); }}, "
                f'"{name}", reinterpret_cast<const void*>(&{name}))')
        pos = args_end
    src = out + src[pos:]
    src = src.replace("__noinline__", "__attribute__((noinline))")  # a CUDA keyword, not a host macro
    return '#include "warp_emulator.h"\n' + src


def translate_torch(src):
    src = re.sub(r"#include <c10/cuda/[^>]+>\n", "", src)
    src = re.sub(r"(const )?c10::cuda::CUDAGuard \w+\([^;]*\);", "", src)
    src = re.sub(r"c10::cuda::getCurrentCUDAStream\((?:[^()]|\([^()]*\))*\)\.stream\(\)", "nullptr", src)
    src = src.replace(".is_cuda()", ".is_cpu()")
    # Keep one registration: the CUDA one, now for CPU tensors (or the CPU one where both register the same
    # functions, which then take their CUDA branch).
    blocks = {}
    for m in re.finditer(r"TORCH_LIBRARY_IMPL\(r2lm, (CPU|CUDA), m\) \{", src):
        end = match_close(src, m.end() - 1, "{", "}")
        if m.group(1) in blocks:
            raise SystemExit(f"translate.py: two TORCH_LIBRARY_IMPL blocks for {m.group(1)}")
        blocks[m.group(1)] = (m.start(), end)
    if set(blocks) != {"CPU", "CUDA"}:
        raise SystemExit("translate.py: expected one TORCH_LIBRARY_IMPL block for CPU and one for CUDA")
    cpu, cuda = blocks["CPU"], blocks["CUDA"]
    same = re.sub(r"\bCPU\b", "CUDA", src[cpu[0]:cpu[1]]) == src[cuda[0]:cuda[1]]
    drop = cuda if same else cpu
    src = src[:drop[0]] + src[drop[1]:]
    src = src.replace("TORCH_LIBRARY_IMPL(r2lm, CUDA, m)", "TORCH_LIBRARY_IMPL(r2lm, CPU, m)")
    return src


if __name__ == "__main__":
    source, out = Path(sys.argv[1]), Path(sys.argv[2])
    translate = translate_cu if source.suffix == ".cu" else translate_torch
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"// Generated by scripts/cuda_emulator/translate.py from {source.name}: do not edit.\n"
                   + translate(source.read_text()))
