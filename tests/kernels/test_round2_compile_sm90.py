"""The decode-attention and int8 kernels compile for an H100 (sm_90) on any machine.

The interpreter runs the kernels' Python, not Triton's compiler; this compiles them (Triton ->
PTX -> cubin with the ptxas bundled in the Triton wheel) so that GPU-only codegen errors show on CPU.
It runs in a child process: the interpreter (set for this test session) replaces Triton's language
functions, which compilation needs.
"""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="triton is not installed")

SCRIPT = textwrap.dedent('''
    import sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import napari_medplib.kernels.decode_attention as da
    import napari_medplib.kernels.int8 as k8

    def compile_for_h100(fn, types, consts):
        signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
        constexprs = {(fn.arg_names.index(n),): v for n, v in consts.items()}
        try:
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                      target=GPUTarget("cuda", 90, 32))
        except RuntimeError as exc:
            if "ptxas" in str(exc):
                print("NO-PTXAS", exc)
                sys.exit(0)
            raise
        assert compiled.asm.get("cubin"), fn
        print("compiled", fn.__name__, consts)

    for dt in ("bf16", "fp32"):
        for group, pad in ((1, 2), (4, 4)):
            t = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "len_ptr": "*i32",
                 "acc_ptr": "*fp32", "stats_ptr": "*fp32", "scale": "fp32"}
            compile_for_h100(da._split_kernel, t, {"GROUP": group, "GROUP_PAD": pad, "HEAD_DIM": 128,
                                                   "DIM_PAD": 128, "BLOCK_N": da.DEFAULT_BLOCK_N})
        compile_for_h100(da._combine_kernel, {"acc_ptr": "*fp32", "stats_ptr": "*fp32", "out_ptr": f"*{dt}"},
                         {"HEAD_DIM": 128, "DIM_PAD": 128, "SPLIT_PAD": 16})
        for has_ids in (True, False):
            t = {"x_ptr": f"*{dt}", "w_ptr": "*i8", "s_ptr": "*fp32", "ids_ptr": "*i64", "b_ptr": f"*{dt}",
                 "out_ptr": f"*{dt}"}
            compile_for_h100(k8._int8_gemv_kernel, t, {"X_DIV": 2 if has_ids else 1, "HAS_IDS": has_ids,
                                                       "HAS_BIAS": not has_ids, "BLOCK_N": 64, "BLOCK_K": 128})
        t = {"x_ptr": f"*{dt}", "w_ptr": "*i8", "s_ptr": "*fp32", "b_ptr": f"*{dt}", "out_ptr": f"*{dt}"}
        compile_for_h100(k8._int8_mm_kernel, t, {"HAS_BIAS": True, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64,
                                                 "UPCAST": dt == "fp32", "PRECISION": "ieee"})
''')


def test_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # really compile, not a cache hit
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    if "NO-PTXAS" in proc.stdout:
        pytest.skip("this Triton build has no ptxas")
    assert proc.stdout.count("compiled") == 12
