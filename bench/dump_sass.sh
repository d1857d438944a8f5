export PYTHONPATH=$PWD/src FLASHDEC_CACHE_DIR=/tmp/fdc
python3 - <<'PY'
import os
from flashdec.backends.cuda._modules import compile_kernel
from flashdec.backends.cuda._kernels import shipped_kernels, MmaSpec
for s in shipped_kernels():
    if isinstance(s, MmaSpec) and s.head_dim == 128 and s.dtype.value == "bfloat16" and s.kv_dtype.value in ("bfloat16", "float8_e4m3fn"):
        m = compile_kernel(s.name_expression, "sm_90")
        open(os.environ["OUT"] + f"/mma_{s.kv_dtype.value}.cubin", "wb").write(m.cubin)
PY
for f in $OUT/*.cubin; do cuobjdump -sass $f > ${f%.cubin}.sass; done
ls -la $OUT
