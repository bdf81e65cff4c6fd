#!/bin/bash
# Why do C++ exceptions from tesloss's library segfault on the GPU machine?
cd "$(dirname "$0")/.."
exec > >(tee "$OUT/diag.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 PYTHONPATH=$PWD
echo "PATH=$PATH CC=${CC-} CXX=${CXX-} LDSHARED=${LDSHARED-} LD_LIBRARY_PATH=${LD_LIBRARY_PATH-}"
for c in /opt/gcc/bin/g++ /usr/bin/g++; do $c --version | head -1; done
command -v c++ g++ gcc cc; ls /opt/gcc/lib64 2>/dev/null | grep -E "stdc|gcc_s|gomp"
python3 -c "import sysconfig as s; print(s.get_config_var('CC'), '|', s.get_config_var('LDSHARED'))"
cat > /tmp/t.py <<'PY'
import torch, tesloss
info = tesloss.backend_info(); print(info["extension_loaded"], info["load_error"], info["devices"])
vis = torch.randn(4, 10)
def attempt(what, f):
    try: f(); print(what, ": no error")
    except Exception as e: print(what, ": caught", type(e).__name__, str(e)[:100].replace("\n", " "))
attempt("torch's own error", lambda: torch.ones(2) @ torch.ones(3))
attempt("raw op, bad tau, cpu", lambda: torch.ops.tesloss.tes_loss_forward(vis, vis, torch.tensor([0, 1, 2, 3]), -1.0, 0.1, 0.3, -100, 1, 0.0))
attempt("label out of range, cpu", lambda: tesloss.fused_tes_loss(vis, vis, torch.tensor([0, 1, 10, 2])))
if "cuda" in info["devices"]:
    v = vis.cuda()
    attempt("raw op, bad tau, cuda", lambda: torch.ops.tesloss.tes_loss_forward(v, v, torch.tensor([0, 1, 2, 3]).cuda(), -1.0, 0.1, 0.3, -100, 1, 0.0))
print("DONE")
PY
build() {  # build NAME ENV...
  local name=$1; shift
  rm -rf build tesloss/_C*.so
  env "$@" MAX_JOBS=16 python3 setup.py build_ext --inplace >"/tmp/build_$name.log" 2>&1 || tail -5 "/tmp/build_$name.log"
  grep -m2 -E "^\S*(g\+\+|c\+\+).*-shared|ccbin \S+" -o "/tmp/build_$name.log" | head -2
  ldd tesloss/_C*.so | grep -E "stdc|gcc_s|gomp"
}
works() { timeout 60 python3 /tmp/t.py 2>&1 | tail -8 | tee /tmp/t.out; grep -q DONE /tmp/t.out; }
echo "== A: as pip builds it"; build A TESLOSS_NO_CUDA=1; works && A=1
true
if [[ -f /opt/gcc/lib64/libstdc++.so.6 ]]; then echo "== A with /opt/gcc's libstdc++ preloaded"; LD_PRELOAD=/opt/gcc/lib64/libstdc++.so.6 works && P=1; fi
echo "== B: the system's gcc"; build B TESLOSS_NO_CUDA=1 CC=/usr/bin/gcc CXX=/usr/bin/g++; works && B=1
echo "== C: /opt/gcc, no -Bsymbolic-functions"; build C TESLOSS_NO_CUDA=1 LDSHARED="/opt/gcc/bin/g++ -shared"; works && C=1
echo "A=${A-} P=${P-} B=${B-} C=${C-}"
if [[ -n ${B-} ]]; then
  echo "== full build with the system's gcc, then the CUDA tests"
  build F FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 CC=/usr/bin/gcc CXX=/usr/bin/g++
  works && TESLOSS_REQUIRE_EXTENSION=1 TESLOSS_HYPOTHESIS_PROFILE=gpu timeout 150 python3 -m pytest -q -rfE -p no:cacheprovider --timeout 140 --junitxml "$OUT/test_cuda.xml" -m cuda tests 2>&1 | tee "$OUT/test_cuda.log" | tail -40
fi
