"""megavl_kernels: Triton kernels against the PyTorch references, values and every gradient.

On CPU the Triton kernels run through Triton's interpreter, so CI checks the kernel code itself;
on a CUDA machine the same shape/dtype sweeps run the compiled kernels on the GPU.
Triton fixes interpreter vs compiled mode when it is first imported, so this module sets
TRITON_INTERPRET=1 before anything imports triton (CPU-only machines). If an earlier test module
already imported triton compiled (torchvision does), the interpreter tests re-run this file in a
subprocess instead (test_interpreter_suite_in_subprocess) rather than silently skipping.
"""
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import megavl_kernels as K  # noqa: E402
from megavl_kernels import backend as kb  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and ("triton" not in sys.modules or kb.interpreter_active())
IN_CHILD = os.environ.get("MEGAVL_KERNELS_TEST_CHILD") == "1"
interp = pytest.mark.skipif(
    not INTERPRETED, reason="triton was imported compiled before this module; run by test_interpreter_suite_in_subprocess")
# The shape/dtype sweeps run the Triton kernels wherever this process can: compiled on CUDA, else interpreted on CPU.
DEV = "cpu" if INTERPRETED else ("cuda" if torch.cuda.is_available() else None)
on_triton_device = pytest.mark.skipif(
    DEV is None, reason="triton was imported compiled before this module; run by test_interpreter_suite_in_subprocess")

# The interpreter rounds fp32 -> bf16 by truncation (GPUs round to nearest), so bf16 values that went
# through fp32 arithmetic may differ by one bf16 ulp; gradients also differ by summation order.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2),
       torch.float64: dict(atol=1e-12, rtol=1e-12)}
DTYPES = [torch.float32, torch.bfloat16]


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    torch.testing.assert_close(a, b, **TOL[dtype])


def run_both(op, inputs: dict, grad_names: list[str], **kw):
    """Forward + backward through the triton and torch backends on fresh leaf copies; (out, grads) each."""
    results = []
    for backend in ("triton", "torch"):
        leaves = {k: (v.detach().clone().requires_grad_(True) if k in grad_names else v) for k, v in inputs.items()}
        # clone() keeps strides, so a non-contiguous input stays non-contiguous.
        out = op(*leaves.values(), backend=backend, **kw)
        torch.manual_seed(1)
        grads = torch.autograd.grad(out, [leaves[k] for k in grad_names], torch.randn_like(out)) if grad_names else []
        results.append((out, grads))
    return results


def random_ids(B: int, N: int, n_ids: int, repeats: bool, dtype=torch.int64, device=None) -> torch.Tensor:
    if repeats:
        return torch.randint(0, N, (B, n_ids), dtype=dtype).to(device)
    return torch.stack([torch.randperm(N)[:n_ids] for _ in range(B)]).to(device, dtype)


# ---------------------------------------------------------------- gather_tokens
GATHER_CASES = [  # B, N, D, K, with_pos, repeated ids, non-contiguous x
    (1, 197, 64, 49, True, False, False),
    (2, 197, 96, 197, True, False, False),   # K = N
    (2, 197, 768, 0, True, False, False),    # K = 0
    (2, 577, 1024, 144, True, True, False),  # repeated ids accumulate in grad_x and grad_pos
    (2, 577, 96, 300, False, True, True),
    (1, 197, 768, 49, True, False, True),
]


@on_triton_device
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,N,D,Kk,with_pos,repeats,strided", GATHER_CASES)
def test_gather_matches_reference(dtype, B, N, D, Kk, with_pos, repeats, strided):
    torch.manual_seed(0)
    x = torch.randn(B, D, N, dtype=dtype, device=DEV).transpose(1, 2) if strided else \
        torch.randn(B, N, D, dtype=dtype, device=DEV)
    assert x.is_contiguous() != strided
    inputs = {"x": x, "ids": random_ids(B, N, Kk, repeats, torch.int32 if strided else torch.int64, DEV)}
    if with_pos:
        inputs["pos"] = torch.randn(N, D, dtype=dtype, device=DEV)
    names = ["x", "pos"] if with_pos else ["x"]
    (out_t, grads_t), (out_r, grads_r) = run_both(K.gather_tokens, inputs, names)
    close(out_t, out_r, dtype)
    if not with_pos:
        assert torch.equal(out_t, out_r)  # a pure copy is exact
    for g_t, g_r in zip(grads_t, grads_r):
        close(g_t, g_r, dtype)


@on_triton_device
def test_gather_repeated_ids_accumulate():
    x = torch.randn(1, 5, 8, device=DEV, requires_grad=True)
    out = K.gather_tokens(x, torch.tensor([[3, 3, 3, 0]], device=DEV), backend="triton")
    out.sum().backward()
    assert x.grad[0, :, 0].tolist() == [1.0, 0.0, 0.0, 3.0, 0.0]


# ---------------------------------------------------------------- scatter_tokens
SCATTER_CASES = [  # B, N, D, K, non-contiguous inputs
    (1, 197, 64, 49, False),
    (2, 197, 96, 197, False),   # K = N: no mask token
    (1, 197, 768, 0, False),    # K = 0: all mask tokens
    (1, 577, 1024, 144, False),
    (2, 197, 96, 50, True),
]


@on_triton_device
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,N,D,Kk,strided", SCATTER_CASES)
def test_scatter_matches_reference(dtype, B, N, D, Kk, strided):
    torch.manual_seed(0)
    kept = torch.randn(B, D, Kk, dtype=dtype, device=DEV).transpose(1, 2) if strided else \
        torch.randn(B, Kk, D, dtype=dtype, device=DEV)
    mask_token = torch.randn(2 * D, dtype=dtype, device=DEV)[::2] if strided else torch.randn(D, dtype=dtype, device=DEV)
    ids_restore = random_ids(B, N, N, False, device=DEV)
    if strided:
        ids_restore = ids_restore.to(torch.int32).t().contiguous().t()
    inputs = {"kept": kept, "ids_restore": ids_restore, "mask_token": mask_token}
    (out_t, grads_t), (out_r, grads_r) = run_both(K.scatter_tokens, inputs, ["kept", "mask_token"])
    assert torch.equal(out_t, out_r)  # a pure copy is exact
    for g_t, g_r in zip(grads_t, grads_r):
        close(g_t, g_r, dtype)


@on_triton_device
def test_scatter_mask_token_grad_sums_masked_positions():
    kept = torch.randn(2, 3, 4, device=DEV, requires_grad=True)
    mask_token = torch.zeros(4, device=DEV, requires_grad=True)
    ids_restore = random_ids(2, 7, 7, False, device=DEV)
    K.scatter_tokens(kept, ids_restore, mask_token, backend="triton").sum().backward()
    assert mask_token.grad.tolist() == [8.0] * 4  # 2 rows x (7 - 3) masked positions
    assert torch.equal(kept.grad, torch.ones_like(kept))


# ---------------------------------------------------------------- masked_patch_targets
PATCH_CASES = [  # B, C, H, W, patch, M, repeats, layout
    (1, 3, 224, 224, 16, 60, False, "contiguous"),
    (2, 3, 96, 80, 16, 30, False, "channels_last"),  # non-square grid, non-contiguous
    (2, 3, 56, 42, 14, 12, False, "contiguous"),     # patch and N not powers of two, M = N
    (2, 1, 32, 32, 8, 10, True, "contiguous"),
    (2, 3, 32, 32, 16, 0, False, "contiguous"),      # M = 0
]


@on_triton_device
@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,C,H,W,patch,M,repeats,layout", PATCH_CASES)
def test_patch_targets_match_reference(norm_pix, dtype, B, C, H, W, patch, M, repeats, layout):
    torch.manual_seed(0)
    images = torch.rand(B, C, H, W, dtype=dtype, device=DEV) * 4 - 1
    if layout == "channels_last":
        images = images.contiguous(memory_format=torch.channels_last)
    ids = random_ids(B, (H // patch) * (W // patch), M, repeats, device=DEV)
    (out_t, _), (out_r, _) = run_both(K.masked_patch_targets, {"images": images, "ids_masked": ids,
                                                               "patch": patch, "norm_pix": norm_pix}, [])
    close(out_t, out_r, dtype)
    if not norm_pix:
        assert torch.equal(out_t, out_r)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=interp), "torch"])
def test_patch_targets_carry_no_grad(backend):
    images = torch.randn(1, 3, 32, 32, requires_grad=True)
    out = K.masked_patch_targets(images, torch.tensor([[0, 3]]), 16, backend=backend)
    assert not out.requires_grad


def test_patch_targets_reference_is_patchify_plus_normalise():
    images = torch.randn(2, 3, 32, 48, dtype=torch.float64)
    ids = torch.tensor([[5, 0], [2, 2]])
    target = K.masked_patch_targets(images, ids, 16, backend="torch")
    b, m = 0, 0  # token 5 of a 2x3 grid: row 1, column 2
    pixels = images[b, :, 16:32, 32:48].permute(1, 2, 0).reshape(-1)
    assert torch.allclose(target[b, m], (pixels - pixels.mean()) / (pixels.var() + 1e-6).sqrt())


# ---------------------------------------------------------------- references: gradcheck in float64
def test_gather_reference_gradcheck():
    x = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 6, 6, 2], [1, 1, 3, 5]])
    assert torch.autograd.gradcheck(lambda a, p: K.gather_tokens_ref(a, ids, p), (x, pos))


def test_scatter_reference_gradcheck():
    kept = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    mask_token = torch.randn(5, dtype=torch.float64, requires_grad=True)
    ids_restore = torch.stack([torch.randperm(7) for _ in range(2)])
    assert torch.autograd.gradcheck(lambda k, m: K.scatter_tokens_ref(k, ids_restore, m), (kept, mask_token))


# ---------------------------------------------------------------- launch shapes
@pytest.mark.parametrize("D", [1, 7, 64, 96, 197, 768, 1024, 1536, 3000, 4096])
def test_row_tiles_cover_every_column_once(D):
    from megavl_kernels.tiling import TILE, row_tiles

    t = row_tiles(1000, D)
    assert t.grid[1] * t.BLOCK_D >= D > (t.grid[1] - 1) * t.BLOCK_D  # no missing, no empty D-block
    assert t.grid[0] * t.ROWS >= 1000 > (t.grid[0] - 1) * t.ROWS
    assert t.ROWS * t.BLOCK_D <= max(TILE, t.BLOCK_D)
    assert t.BLOCK_D & (t.BLOCK_D - 1) == 0


def test_row_tiles_avoid_idle_lanes_at_vit_widths():
    from megavl_kernels.tiling import row_tiles

    assert (row_tiles(1, 768).BLOCK_D, row_tiles(1, 1024).BLOCK_D) == (256, 1024)


# ---------------------------------------------------------------- dispatch
def _spy_reference(monkeypatch, name: str) -> list:
    calls = []
    real = getattr(K.ops, name)
    monkeypatch.setattr(K.ops, name, lambda *a, **kw: calls.append(name) or real(*a, **kw))
    return calls


def test_auto_runs_reference_on_cpu(monkeypatch):
    monkeypatch.delenv(kb.ENV_VAR, raising=False)
    calls = _spy_reference(monkeypatch, "gather_tokens_ref")
    K.gather_tokens(torch.randn(1, 4, 8), torch.tensor([[1, 2]]))
    assert calls == ["gather_tokens_ref"]


@interp
def test_env_forces_triton_through_the_interpreter(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    launches = []
    real_run = InterpretedFunction.run
    monkeypatch.setattr(InterpretedFunction, "run", lambda self, *a, **kw: launches.append(self.fn.__name__)
                        or real_run(self, *a, **kw))
    calls = _spy_reference(monkeypatch, "gather_tokens_ref")
    monkeypatch.setenv(kb.ENV_VAR, "triton")
    out = K.gather_tokens(torch.randn(1, 4, 8), torch.tensor([[1, 2]]), torch.randn(4, 8))
    assert calls == [] and launches == ["_gather_fwd_kernel"] and out.shape == (1, 2, 8)
    assert kb.interpreter_active()


def test_env_forces_reference(monkeypatch):
    monkeypatch.setenv(kb.ENV_VAR, "torch")
    calls = _spy_reference(monkeypatch, "scatter_tokens_ref")
    K.scatter_tokens(torch.randn(1, 2, 8), torch.tensor([[2, 0, 1]]), torch.zeros(8))
    assert calls == ["scatter_tokens_ref"]


def test_unknown_backend_is_an_error(monkeypatch):
    with pytest.raises(ValueError, match="must be one of"):
        K.gather_tokens(torch.randn(1, 4, 8), torch.tensor([[1]]), backend="cuda")
    monkeypatch.setenv(kb.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="MEGAVL_KERNELS"):
        K.gather_tokens(torch.randn(1, 4, 8), torch.tensor([[1]]))


# ---------------------------------------------------------------- bad input: clear errors on every backend
BACKENDS = [pytest.param("triton", marks=interp), "torch"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [-1, 4])
def test_gather_rejects_out_of_range_ids(backend, bad):
    with pytest.raises(IndexError, match=r"\[0, 4\)"):
        K.gather_tokens(torch.randn(2, 4, 8), torch.tensor([[0, 1], [bad, 2]]), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_rejects_bad_types_and_shapes(backend):
    x, ids = torch.randn(2, 4, 8), torch.tensor([[0, 1], [3, 2]])
    cases = [
        (TypeError, "int32 or int64", (x, ids.float())),
        (TypeError, "x must be one of", (x.long(), ids)),
        (ValueError, r"x must be \(B, N, D\)", (x[0], ids)),
        (ValueError, r"ids must be \(B=2, K\)", (x, ids[:1])),
        (ValueError, r"pos must be \(N, D\)", (x, ids, torch.randn(5, 8))),
        (TypeError, "pos dtype", (x, ids, torch.randn(4, 8, dtype=torch.float64))),
        (ValueError, "ids is on meta", (x, ids.to("meta"))),
        (ValueError, "pos is on meta", (x, ids, torch.randn(4, 8, device="meta"))),
    ]
    for error, match, args in cases:
        with pytest.raises(error, match=match):
            K.gather_tokens(*args, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scatter_rejects_bad_input(backend):
    kept, mask_token = torch.randn(1, 2, 8), torch.zeros(8)
    cases = [
        (ValueError, "permutation", (kept, torch.tensor([[0, 0, 1]]), mask_token)),
        (IndexError, r"\[0, 3\)", (kept, torch.tensor([[0, 3, 1]]), mask_token)),
        (ValueError, "K=2 > N", (kept, torch.tensor([[0]]), mask_token)),
        (ValueError, r"mask_token must be \(D,\)", (kept, torch.tensor([[2, 0, 1]]), torch.zeros(7))),
        (TypeError, "int32 or int64", (kept, torch.tensor([[2.0, 0.0, 1.0]]), mask_token)),
        (ValueError, "mask_token is on meta", (kept, torch.tensor([[2, 0, 1]]), mask_token.to("meta"))),
    ]
    for error, match, args in cases:
        with pytest.raises(error, match=match):
            K.scatter_tokens(*args, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_targets_reject_bad_input(backend):
    images = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="not a multiple of patch=12"):
        K.masked_patch_targets(images, torch.tensor([[0]]), 12, backend=backend)
    with pytest.raises(IndexError, match=r"\[0, 4\)"):
        K.masked_patch_targets(images, torch.tensor([[4]]), 16, backend=backend)
    with pytest.raises(ValueError, match="images must be"):
        K.masked_patch_targets(images[0], torch.tensor([[0]]), 16, backend=backend)


# ---------------------------------------------------------------- interpreter suite when triton came in compiled
@on_triton_device
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernels_at_several_frames_match_a_frame_by_frame_reference(dtype):
    """Clips (T = 3 frames): the vision tower gathers the kept patches of its (B*T, N, D) frames with
    the tube mask's keep_ids repeated per frame (MaskSpec.per_frame), the MAE decoder scatters the
    same way and the pixel targets read each frame's masked patches. Triton on those rows equals a
    loop over samples and frames, values and gradients."""
    from megavl.objectives.masking import random_masking

    torch.manual_seed(0)
    B, T, N, D, patch = 2, 3, 16, 12, 4
    spec = random_masking(B, N, 0.7, generator=torch.Generator().manual_seed(0))
    tube = spec.per_frame(T)
    x = torch.randn(B * T, N, D, dtype=dtype, device=DEV)
    pos = torch.randn(N, D, dtype=dtype, device=DEV)
    (out_t, grads_t), (out_r, grads_r) = run_both(K.gather_tokens, {"x": x, "ids": tube.keep_ids.to(DEV), "pos": pos},
                                                  ["x", "pos"])
    expected = torch.stack([x[b * T + t][spec.keep_ids[b]] + pos[spec.keep_ids[b]]
                            for b in range(B) for t in range(T)])
    close(out_t, expected, dtype)
    for g_t, g_r in zip(grads_t, grads_r):
        close(g_t, g_r, dtype)

    kept = torch.randn(B * T, spec.num_keep, D, dtype=dtype, device=DEV)
    mask_token = torch.randn(D, dtype=dtype, device=DEV)
    (out_t, grads_t), (out_r, grads_r) = run_both(
        K.scatter_tokens, {"kept": kept, "ids_restore": tube.ids_restore.to(DEV), "mask_token": mask_token},
        ["kept", "mask_token"])
    expected = torch.stack([torch.stack([kept[b * T + t, spec.ids_restore[b, n]] if not spec.mask[b, n] else mask_token
                                         for n in range(N)]) for b in range(B) for t in range(T)])
    close(out_t, expected, dtype)
    for g_t, g_r in zip(grads_t, grads_r):
        close(g_t, g_r, dtype)

    frames = torch.randn(B * T, 3, 16, 16, dtype=dtype, device=DEV)
    targets = K.masked_patch_targets(frames, tube.ids_masked.to(DEV), patch, False, backend="triton")
    expected = torch.stack([torch.stack([frames[b * T + t, :, (n // 4) * patch:(n // 4 + 1) * patch,
                                                (n % 4) * patch:(n % 4 + 1) * patch].permute(1, 2, 0).reshape(-1)
                                         for n in spec.ids_masked[b].tolist()]) for b in range(B) for t in range(T)])
    close(targets, expected, dtype)


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED or IN_CHILD or torch.cuda.is_available(),
                    reason="the interpreter tests already ran in this process")
def test_interpreter_suite_in_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1", MEGAVL_KERNELS_TEST_CHILD="1")
    env.pop(kb.ENV_VAR, None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "not gpu", "-k", "not in_subprocess",
                           "-p", "no:cacheprovider", __file__],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]


# ---------------------------------------------------------------- CUDA: the compiled kernels
gpu_compiled = pytest.mark.skipif(INTERPRETED, reason="this process runs Triton in interpreter mode")


@pytest.mark.gpu
@gpu_compiled
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_kernels_match_reference_at_vit_b(dtype):
    torch.manual_seed(0)
    B, N, D, Kk = 8, 196, 768, 49
    x = torch.randn(B, N, D, dtype=dtype, device="cuda")
    pos = torch.randn(N, D, dtype=dtype, device="cuda")
    ids = random_ids(B, N, Kk, False).cuda()
    (out_t, grads_t), (out_r, grads_r) = run_both(K.gather_tokens, {"x": x, "ids": ids, "pos": pos}, ["x", "pos"])
    assert torch.equal(out_t, out_r)  # the GPU rounds the fp32 add to nearest, as torch does
    for g_t, g_r in zip(grads_t, grads_r):
        close(g_t, g_r, dtype)

    ids_restore = random_ids(B, N, N, False).cuda()
    inputs = {"kept": out_r.detach(), "ids_restore": ids_restore, "mask_token": pos[0].clone()}
    (out_t, grads_t), (out_r, grads_r) = run_both(K.scatter_tokens, inputs, ["kept", "mask_token"])
    assert torch.equal(out_t, out_r)
    for g_t, g_r in zip(grads_t, grads_r):
        close(g_t, g_r, dtype)

    images = torch.randn(B, 3, 224, 224, dtype=dtype, device="cuda")
    ids_masked = random_ids(B, N, N - Kk, False).cuda()
    for norm_pix in (True, False):
        close(K.masked_patch_targets(images, ids_masked, 16, norm_pix, backend="triton"),
              K.masked_patch_targets(images, ids_masked, 16, norm_pix, backend="torch"), dtype)


@pytest.mark.gpu
@gpu_compiled
def test_cuda_auto_picks_triton(monkeypatch):
    monkeypatch.delenv(kb.ENV_VAR, raising=False)
    calls = _spy_reference(monkeypatch, "gather_tokens_ref")
    K.gather_tokens(torch.randn(1, 4, 8, device="cuda"), torch.tensor([[1, 2]], device="cuda"))
    assert calls == []
