// Warp emulator runtime: fibers, the scheduler, collectives, cp.async, the CUDA runtime calls the kernels make.
#include "warp_emulator.h"

#include <sys/mman.h>
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <random>
#include <vector>

// Fiber switch without the signal-mask system call of swapcontext: saves the callee-saved registers and
// the SSE / x87 control words on the current stack, stores its pointer in *save, continues on `next`.
extern "C" void emu_switch(void** save, void* next);
asm(R"(
.text
.globl emu_switch
.type emu_switch,@function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size emu_switch, .-emu_switch
)");

namespace emu {
uint3 g_thread_idx, g_block_idx;
dim3 g_block_dim, g_grid_dim;

namespace {
enum class State { kRunnable, kWarpOp, kBarrier, kDone };
enum class Op { kShfl, kLdmatrix, kMma };

struct Copy {
  unsigned dst;
  unsigned char data[16];
};

struct Fiber {
  void* sp = nullptr;
  void* stack = nullptr;
  uint3 tid;
  State state = State::kDone;
  Op op;
  unsigned mask;
  int lane_mask, width;
  uint64_t bits, out_bits;
  bool trans;
  unsigned addr, out_r[4];
  MmaType mt;
  float c[4];
  unsigned a[4], b[2];
  int pred, count;
  std::vector<std::vector<Copy>> groups;
  std::vector<Copy> open;
};

constexpr size_t kStackBytes = 512 * 1024;
std::vector<Fiber> fibers;
void* sched_sp = nullptr;
int current = -1;
int n_threads = 0;
const std::function<void()>* g_body = nullptr;
unsigned char* smem = nullptr;
size_t smem_size = 0;
std::mt19937 rng;  // reseeded per launch: a failing test replays alone
const char* kernel_name = "";
cudaError_t pending_error = cudaSuccess;
std::map<const void*, int> smem_opt_in;
// Race check of the dynamic shared memory written by cp.async and read by ldmatrix, per 16-byte chunk: a read
// must follow the copy's landing with a __syncthreads in between (unless the reading warp copied it: lanes
// of one warp are not checked against each other), and a copy must not be issued into a chunk another warp
// read or copied since the last __syncthreads.
struct Chunk {
  int in_flight_by = -1, landed_by = -1;
  long long landed_epoch = -1, read_epoch = -1;
  unsigned read_warps = 0;
};
std::vector<Chunk> chunks;
long long epoch = 0;

// A kernel bug: the message goes to stderr and, since a test runner may capture stderr and the process
// aborts, to the file R2LM_EMULATOR_LOG names. Aborting (not raising) keeps a test that expects an error
// from passing on an emulator failure.
[[noreturn]] void fail(const char* fmt, ...) {
  char message[1024];
  int n = std::snprintf(message, sizeof message, "[emu] kernel %s, block (%u,%u,%u)", kernel_name, g_block_idx.x,
                        g_block_idx.y, g_block_idx.z);
  if (current >= 0) n += std::snprintf(message + n, sizeof message - n, ", thread %d", current);
  n += std::snprintf(message + n, sizeof message - n, ": ");
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(message + n, sizeof message - n, fmt, ap);
  va_end(ap);
  std::fprintf(stderr, "\n%s\n", message);
  std::fflush(stderr);
  if (const char* log = std::getenv("R2LM_EMULATOR_LOG")) {
    if (FILE* f = std::fopen(log, "a")) {
      std::fprintf(f, "%s\n", message);
      std::fclose(f);
    }
  }
  std::abort();
}

Fiber& self() {
  if (current < 0) fail("device function called outside a kernel");
  return fibers[current];
}

// AddressSanitizer is told about every stack switch (it tracks the current stack's bounds).
#if defined(__SANITIZE_ADDRESS__)
const void* sched_stack_bottom = nullptr;
size_t sched_stack_size = 0;
void entered_fiber() { __sanitizer_finish_switch_fiber(nullptr, &sched_stack_bottom, &sched_stack_size); }
void leaving_fiber() { __sanitizer_start_switch_fiber(nullptr, sched_stack_bottom, sched_stack_size); }
#else
void entered_fiber() {}
void leaving_fiber() {}
#endif

void yield_to_scheduler() {
  leaving_fiber();
  emu_switch(&fibers[current].sp, sched_sp);
  entered_fiber();
}

[[noreturn]] void fiber_entry() {
  entered_fiber();
  (*g_body)();
  Fiber& f = fibers[current];
  bool in_flight = !f.open.empty();
  for (const auto& group : f.groups) in_flight |= !group.empty();
  if (in_flight) fail("thread exited with cp.async copies in flight");
  f.state = State::kDone;
  void* dead;
  leaving_fiber();
  emu_switch(&dead, sched_sp);
  __builtin_unreachable();
}

// A fresh stack that emu_switch "returns" into fiber_entry (with the ABI's 16-byte call alignment).
void* initial_stack(void* stack, uint32_t mxcsr) {
#if defined(__SANITIZE_ADDRESS__)
  ASAN_UNPOISON_MEMORY_REGION(stack, kStackBytes);  // redzones left by the last CTA's frames
#endif
  auto* top = reinterpret_cast<uint64_t*>(static_cast<char*>(stack) + kStackBytes);
  top[-1] = 0;                                            // fiber_entry's (unused) return address
  top[-2] = reinterpret_cast<uint64_t>(&fiber_entry);     // popped by ret
  for (int r = 3; r <= 8; ++r) top[-r] = 0;               // rbp rbx r12 r13 r14 r15
  top[-9] = mxcsr | (0x037full << 32);                     // the launcher's mxcsr (FTZ / DAZ), x87 control word
  return top - 9;
}

void run_fiber(int i) {
  current = i;
  g_thread_idx = fibers[i].tid;
#if defined(__SANITIZE_ADDRESS__)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, fibers[i].stack, kStackBytes);
  emu_switch(&sched_sp, fibers[i].sp);
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
  emu_switch(&sched_sp, fibers[i].sp);
#endif
  current = -1;
}

float half_bits_to_float(uint16_t h, MmaType t) {
  if (t == MmaType::kBf16) return __uint_as_float(uint32_t(h) << 16);
  __half_raw raw;
  raw.x = h;
  return __half2float(__half(raw));
}

// Both users move 16-byte rows.
void check_smem(unsigned addr, const char* what) {
  if (addr % 16 != 0) fail("%s: shared address %u not 16-byte aligned", what, addr);
  if (size_t(addr) + 16 > smem_size)
    fail("%s: shared address %u + 16 beyond the %zu bytes of dynamic shared memory", what, addr, smem_size);
}

// Resolves warp w's collective when every lane it needs has arrived; false if some lane is still away.
bool resolve_warp(int w) {
  const int lo = w * 32, hi = std::min(lo + 32, n_threads);
  int first = -1;
  for (int i = lo; i < hi; ++i)
    if (fibers[i].state == State::kWarpOp) { first = i; break; }
  if (first < 0) return false;
  const Fiber& f0 = fibers[first];
  const unsigned need = f0.op == Op::kShfl ? f0.mask : 0xffffffffu;
  if (hi - lo < 32 && (need >> (hi - lo)) != 0)
    fail("warp %d: a collective's mask names lanes past the block's last thread", w);
  for (int l = 0; l < hi - lo; ++l) {
    if (!(need >> l & 1)) continue;
    const Fiber& f = fibers[lo + l];
    if (f.state == State::kDone) fail("warp %d: warp collective while lane %d has exited", w, l);
    if (f.state == State::kBarrier) return false;  // may be a deadlock: reported by the scheduler
    if (f.op != f0.op) fail("warp %d: lanes at different collectives (divergence)", w);
    if (f.op == Op::kShfl && f.mask != f0.mask) fail("warp %d: shfl masks differ", w);
  }
  if (f0.op == Op::kShfl) {
    for (int l = 0; l < hi - lo; ++l) {
      if (!(need >> l & 1)) continue;
      Fiber& f = fibers[lo + l];
      const int seg = l / f.width * f.width;
      int src = l ^ (f.lane_mask & 31);
      if (src >= seg + f.width) src = l;  // a later group: the lane's own value (earlier groups are readable)
      if (src >= hi - lo || !(need >> src & 1)) fail("warp %d: shfl from lane %d outside the mask", w, src);
      f.out_bits = fibers[lo + src].bits;
    }
  } else if (f0.op == Op::kLdmatrix) {
    if (hi - lo != 32) fail("ldmatrix in a partial warp");
    uint16_t m[4][8][8];
    for (int i = 0; i < 4; ++i)
      for (int r = 0; r < 8; ++r) {
        const Fiber& f = fibers[lo + 8 * i + r];
        if (f.trans != f0.trans) fail("ldmatrix: .trans differs between lanes");
        check_smem(f.addr, "ldmatrix");
        Chunk& c = chunks[f.addr / 16];
        if (c.in_flight_by >= 0)
          fail("warp %d: ldmatrix reads shared byte %u while a cp.async into it is in flight", w, f.addr);
        if (c.landed_epoch == epoch && c.landed_by / 32 != w)
          fail("warp %d: ldmatrix reads shared byte %u copied by thread %d (another warp) with no __syncthreads "
               "since", w, f.addr, c.landed_by);
        if (c.read_epoch != epoch) c.read_warps = 0;
        c.read_epoch = epoch;
        c.read_warps |= 1u << (w % 32);
        std::memcpy(m[i][r], smem + f.addr, 16);
      }
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      for (int i = 0; i < 4; ++i) {
        const uint16_t x0 = f0.trans ? m[i][2 * t][g] : m[i][g][2 * t];
        const uint16_t x1 = f0.trans ? m[i][2 * t + 1][g] : m[i][g][2 * t + 1];
        fibers[lo + l].out_r[i] = unsigned(x0) | (unsigned(x1) << 16);
      }
    }
  } else {
    if (hi - lo != 32) fail("mma in a partial warp");
    float A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; ++l) {
      const Fiber& f = fibers[lo + l];
      if (f.mt != f0.mt) fail("mma: types differ between lanes");
      const int g = l / 4, t = l % 4;
      auto lo16 = [](unsigned x) { return uint16_t(x & 0xffff); };
      auto hi16 = [](unsigned x) { return uint16_t(x >> 16); };
      const int rows[4] = {g, g + 8, g, g + 8}, cols[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
      for (int r = 0; r < 4; ++r) {
        A[rows[r]][cols[r]] = half_bits_to_float(lo16(f.a[r]), f.mt);
        A[rows[r]][cols[r] + 1] = half_bits_to_float(hi16(f.a[r]), f.mt);
      }
      B[2 * t][g] = half_bits_to_float(lo16(f.b[0]), f.mt);
      B[2 * t + 1][g] = half_bits_to_float(hi16(f.b[0]), f.mt);
      B[2 * t + 8][g] = half_bits_to_float(lo16(f.b[1]), f.mt);
      B[2 * t + 9][g] = half_bits_to_float(hi16(f.b[1]), f.mt);
      C[g][2 * t] = f.c[0];
      C[g][2 * t + 1] = f.c[1];
      C[g + 8][2 * t] = f.c[2];
      C[g + 8][2 * t + 1] = f.c[3];
    }
    for (int l = 0; l < 32; ++l) {
      Fiber& f = fibers[lo + l];
      const int g = l / 4, t = l % 4;
      const int rr[4] = {g, g, g + 8, g + 8}, cc[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
      for (int e = 0; e < 4; ++e) {
        double acc = C[rr[e]][cc[e]];
        for (int k = 0; k < 16; ++k) acc += double(A[rr[e]][k]) * double(B[k][cc[e]]);
        f.c[e] = float(acc);
      }
    }
  }
  for (int l = 0; l < hi - lo; ++l)
    if (need >> l & 1) fibers[lo + l].state = State::kRunnable;
  return true;
}

void run_cta() {
  const int n_warps = (n_threads + 31) / 32;
  std::vector<int> order(n_warps);
  for (int w = 0; w < n_warps; ++w) order[w] = w;
  for (;;) {
    std::shuffle(order.begin(), order.end(), rng);
    for (int w : order)
      for (int i = w * 32; i < std::min(w * 32 + 32, n_threads); ++i)
        while (fibers[i].state == State::kRunnable) run_fiber(i);
    bool progress = false;
    for (int w = 0; w < n_warps; ++w) progress |= resolve_warp(w);
    if (progress) continue;
    int done = 0, at_barrier = 0;
    for (int i = 0; i < n_threads; ++i) {
      done += fibers[i].state == State::kDone;
      at_barrier += fibers[i].state == State::kBarrier;
    }
    if (done == n_threads) return;
    if (done + at_barrier == n_threads) {
      int count = 0;
      for (int i = 0; i < n_threads; ++i)
        if (fibers[i].state == State::kBarrier) count += fibers[i].pred != 0;
      ++epoch;
      for (int i = 0; i < n_threads; ++i)
        if (fibers[i].state == State::kBarrier) {
          fibers[i].count = count;
          fibers[i].state = State::kRunnable;
        }
      continue;
    }
    fail("deadlock: %d done, %d at __syncthreads, %d at warp collectives", done, at_barrier,
         n_threads - done - at_barrier);
  }
}
}  // namespace

void launch(dim3 grid, dim3 block, size_t dyn_smem, const std::function<void()>& body, const char* name,
            const void* func) {
  kernel_name = name;
  const long long threads = (long long)block.x * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0 || threads > 1024 || grid.y > 65535 ||
      grid.z > 65535 || block.z > 64) {
    std::fprintf(stderr, "[emu] %s: invalid launch configuration grid (%u,%u,%u) block (%u,%u,%u)\n", name, grid.x,
                 grid.y, grid.z, block.x, block.y, block.z);
    pending_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (dyn_smem > 48 * 1024) {
    const auto it = smem_opt_in.find(func);
    if (it == smem_opt_in.end() || it->second < int(dyn_smem)) {
      std::fprintf(stderr, "[emu] %s: %zu bytes of dynamic shared memory without opt-in\n", name, dyn_smem);
      pending_error = cudaErrorInvalidValue;
      return;
    }
  }
  n_threads = int(threads);
  if (int(fibers.size()) < n_threads) fibers.resize(n_threads);
  for (auto& f : fibers)
    if (!f.stack) {
      f.stack = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (f.stack == MAP_FAILED) fail("mmap of a fiber stack failed");
    }
  smem_size = dyn_smem;
  smem = static_cast<unsigned char*>(std::malloc(dyn_smem ? dyn_smem : 1));
  g_body = &body;
  rng.seed(12345);
  const uint32_t mxcsr = __builtin_ia32_stmxcsr();
  g_grid_dim = grid;
  g_block_dim = block;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        g_block_idx = make_uint3(x, y, z);
        std::memset(smem, 0xff, dyn_smem);  // poison: unwritten shared memory reads as NaN
        chunks.assign((dyn_smem + 15) / 16, Chunk{});
        epoch = 0;
        for (int i = 0; i < n_threads; ++i) {
          Fiber& f = fibers[i];
          f.tid = make_uint3(i % block.x, i / block.x % block.y, i / (block.x * block.y));
          f.state = State::kRunnable;
          f.groups.clear();
          f.open.clear();
          f.sp = initial_stack(f.stack, mxcsr);
        }
        run_cta();
      }
  std::free(smem);
  smem = nullptr;
  smem_size = 0;
}

unsigned char* dynamic_smem() { return smem; }

unsigned cvta_shared(const void* p) {
  const auto* c = static_cast<const unsigned char*>(p);
  if (c < smem || c > smem + smem_size) fail("__cvta_generic_to_shared of a pointer outside dynamic shared memory");
  return unsigned(c - smem);
}

void syncthreads() {
  Fiber& f = self();
  f.pred = 0;
  f.state = State::kBarrier;
  yield_to_scheduler();
}

int syncthreads_count(int pred) {
  Fiber& f = self();
  f.pred = pred;
  f.state = State::kBarrier;
  yield_to_scheduler();
  return fibers[current].count;
}

uint64_t shfl_xor_bits(unsigned mask, uint64_t bits, int lane_mask, int width) {
  Fiber& f = self();
  if (width <= 0 || width > 32 || (width & (width - 1))) fail("shfl width %d", width);
  f.op = Op::kShfl;
  f.mask = mask;
  f.bits = bits;
  f.lane_mask = lane_mask;
  f.width = width;
  f.state = State::kWarpOp;
  yield_to_scheduler();
  return fibers[current].out_bits;
}

void cp_async(unsigned dst, const void* src, int src_bytes) {
  Fiber& f = self();
  check_smem(dst, "cp.async");
  if (src_bytes < 0 || src_bytes > 16) fail("cp.async src-size %d", src_bytes);
  Copy c{};
  c.dst = dst;
  if (src_bytes > 0) {
    if (reinterpret_cast<uintptr_t>(src) % 16 != 0) fail("cp.async: global address %p not 16-byte aligned", src);
    std::memcpy(c.data, src, src_bytes);
  }
  Chunk& ch = chunks[dst / 16];
  if (ch.in_flight_by >= 0)
    fail("cp.async into shared byte %u, where thread %d's copy is still in flight", dst, ch.in_flight_by);
  const int warp = current / 32;
  if (ch.read_epoch == epoch && (ch.read_warps & ~(1u << (warp % 32))))
    fail("cp.async into shared byte %u that another warp read since the last __syncthreads", dst);
  if (ch.landed_epoch == epoch && ch.landed_by / 32 != warp)
    fail("cp.async into shared byte %u that another warp copied since the last __syncthreads", dst);
  ch.in_flight_by = current;
  std::memset(smem + dst, 0xff, 16);  // in flight: racing reads see NaN
  f.open.push_back(c);
}

void cp_async_commit() {
  Fiber& f = self();
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}

void cp_async_wait(int n) {
  Fiber& f = self();
  while (int(f.groups.size()) > n) {
    for (const Copy& c : f.groups.front()) {
      std::memcpy(smem + c.dst, c.data, 16);
      Chunk& ch = chunks[c.dst / 16];
      ch.in_flight_by = -1;
      ch.landed_by = current;
      ch.landed_epoch = epoch;
    }
    f.groups.erase(f.groups.begin());
  }
}

void ldmatrix_x4(bool trans, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3, unsigned addr) {
  Fiber& f = self();
  f.op = Op::kLdmatrix;
  f.trans = trans;
  f.addr = addr;
  f.state = State::kWarpOp;
  yield_to_scheduler();
  const Fiber& g = fibers[current];
  r0 = g.out_r[0];
  r1 = g.out_r[1];
  r2 = g.out_r[2];
  r3 = g.out_r[3];
}

void mma_m16n8k16(MmaType t, float& c0, float& c1, float& c2, float& c3, unsigned a0, unsigned a1, unsigned a2,
                  unsigned a3, unsigned b0, unsigned b1) {
  Fiber& f = self();
  f.op = Op::kMma;
  f.mt = t;
  f.c[0] = c0; f.c[1] = c1; f.c[2] = c2; f.c[3] = c3;
  f.a[0] = a0; f.a[1] = a1; f.a[2] = a2; f.a[3] = a3;
  f.b[0] = b0; f.b[1] = b1;
  f.state = State::kWarpOp;
  yield_to_scheduler();
  const Fiber& g = fibers[current];
  c0 = g.c[0]; c1 = g.c[1]; c2 = g.c[2]; c3 = g.c[3];
}

void record_opt_in(const void* func, int bytes) { smem_opt_in[func] = bytes; }
// The largest dynamic shared memory a block may opt in to: an H100's 227 KB, or the value of
// R2LM_EMULATOR_SMEM_OPTIN (e.g. 101376 for a GPU of compute capability 8.6 / 8.9).
int smem_opt_in_limit() {
  const char* value = std::getenv("R2LM_EMULATOR_SMEM_OPTIN");
  return value != nullptr ? std::atoi(value) : 227 * 1024;
}
}  // namespace emu

extern "C" {
cudaError_t cudaGetLastError(void) {
  const cudaError_t e = emu::pending_error;
  emu::pending_error = cudaSuccess;
  return e;
}
const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : e == cudaErrorInvalidConfiguration ? "invalid configuration (emu)"
                                                                            : "error (emu)";
}
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value > emu::smem_opt_in_limit()) return emu::pending_error = cudaErrorInvalidValue;  // as CUDA, kept
    emu::record_opt_in(func, value);
  }
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
  (void)device;
  *value = attr == cudaDevAttrMultiProcessorCount               ? 132
           : attr == cudaDevAttrMaxSharedMemoryPerBlockOptin ? emu::smem_opt_in_limit()
                                                             : 0;
  return cudaSuccess;
}
}
