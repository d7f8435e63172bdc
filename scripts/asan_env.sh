# AddressSanitizer for the dev builds, sourced by asan_cpu.sh and emulate_cuda.sh: the cmake configure
# options of a sanitized build, and asan_preload, to call before running Python on one.
asan_cmake_options=(-DCMAKE_BUILD_TYPE=RelWithDebInfo "-DCMAKE_CXX_FLAGS=-fsanitize=address -fno-omit-frame-pointer"
                    -DCMAKE_SHARED_LINKER_FLAGS=-fsanitize=address)
asan_preload() {
  # libstdc++ preloaded too: the sanitizer's exception interceptor must find it before Python loads it.
  export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
  export ASAN_OPTIONS=detect_leaks=0:detect_stack_use_after_return=0
}
