"""Export a model holding :class:`~protoseg_ext.ProtoSegHead` for inference.

* :func:`export_onnx`: ``torch.onnx.export`` with the dynamo exporter (onnx and
  onnxscript: ``pip install 'protoseg_ext[onnx]'``), dynamic batch, height and
  width. Under ONNX export the head's inference forward is written with standard
  operators (LayerNormalization, MatMul, ReduceMax), so the file runs in ONNX
  Runtime, OpenVINO or TensorRT with no protoseg_ext library. The TorchScript
  exporter (``dynamo=False``) takes the same path.
* :func:`check_onnx`: runs the file in ONNX Runtime's CPU provider and compares
  it with the model.
* :func:`export_aoti`: ``torch.export`` plus AOTInductor
  (``torch._inductor.aoti_compile_and_package``). The graph keeps protoseg_ext's
  fused ops, so the package needs ``import protoseg_ext`` before
  :func:`load_aoti` (which does it).

Export is for inference: a model (or head) in training mode is refused, since
a training step updates the prototypes.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["export_onnx", "check_onnx", "export_aoti", "load_aoti", "require_eval"]


def require_eval(model: nn.Module) -> None:
    """Raise if ``model`` or any submodule is in training mode (export is for inference)."""
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        more = f" and {len(training) - 3} more" if len(training) > 3 else ""
        raise ValueError(
            f"export is for inference: {', '.join(training[:3])}{more} in training mode; call model.eval() first "
            "(a training step of ProtoSegHead updates the prototypes, which an exported graph cannot)"
        )


def _trace_inputs(example: torch.Tensor, dynamic: bool):
    """``((example,), dynamic_shapes)``: batch, height and width of a ``(B, 3, H, W)`` input dynamic.

    A batch of one would be specialised (export treats sizes 0 and 1 as constants, and an
    AOTInductor package then computes garbage for other batches without a word), so a
    one-image example is traced as two copies of itself."""
    if not dynamic:
        return (example,), None
    if example.shape[0] == 1:
        example = example.expand(2, *example.shape[1:]).contiguous()
    auto = torch.export.Dim.AUTO
    return (example,), ({0: auto, 2: auto, 3: auto},)


def export_onnx(model: nn.Module, example: torch.Tensor, path, *, dynamic: bool = True,
                input_name: str = "images", output_name: str = "seg", opset: Optional[int] = None) -> str:
    """Write ``model`` (in eval mode) as ONNX at ``path``, traced on ``example (B, 3, H, W)``.

    With ``dynamic`` the batch, height and width are dynamic (as far as the model allows:
    a backbone that needs a multiple of its stride keeps that constraint). Returns the path.
    """
    require_eval(model)
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError:
        raise ImportError("ONNX export needs onnx and onnxscript: pip install 'protoseg_ext[onnx]'") from None
    kwargs = {} if opset is None else {"opset_version": opset}
    kwargs["verbose"] = False
    args, dynamic_shapes = _trace_inputs(example, dynamic)
    program = torch.onnx.export(
        model, args, dynamo=True, dynamic_shapes=dynamic_shapes,
        input_names=[input_name], output_names=[output_name], **kwargs,
    )
    program.save(os.fspath(path))
    return os.fspath(path)


def _ort_session(path):
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError("checking an ONNX file needs onnxruntime: pip install 'protoseg_ext[onnx]'") from None
    return ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])


def run_onnx(path, images: torch.Tensor, session=None) -> torch.Tensor:
    """The first output of the ONNX model at ``path`` for ``images``, by ONNX Runtime on the CPU."""
    session = session or _ort_session(path)
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: images.detach().cpu().numpy()})[0])


@torch.no_grad()
def check_onnx(path, model: nn.Module, inputs: Sequence[torch.Tensor]) -> Tuple[float, float]:
    """Run ``path`` in ONNX Runtime on each of ``inputs`` and compare with ``model``.

    Returns ``(max abs difference of the outputs, fraction of pixels whose arg-max over
    classes differs)``, over all inputs.
    """
    session = _ort_session(path)
    worst, differ, total = 0.0, 0, 0
    for images in inputs:
        ref = model(images)
        ref = ref[0] if isinstance(ref, (tuple, list)) else ref
        out = run_onnx(path, images, session)
        worst = max(worst, float((out - ref.float().cpu()).abs().max()))
        differ += int((out.argmax(1) != ref.cpu().argmax(1)).sum())
        total += ref.shape[0] * ref.shape[2] * ref.shape[3]
    return worst, differ / max(total, 1)


def export_aoti(model: nn.Module, example: torch.Tensor, path, *, dynamic: bool = True) -> str:
    """``torch.export`` of ``model`` (eval mode) on ``example``, compiled by AOTInductor into
    the package ``path`` (``.pt2``). Returns the path."""
    require_eval(model)
    args, dynamic_shapes = _trace_inputs(example, dynamic)
    program = torch.export.export(model, args, dynamic_shapes=dynamic_shapes)
    return torch._inductor.aoti_compile_and_package(program, package_path=os.fspath(path))


def load_aoti(path):
    """The compiled model of an AOTInductor package written by :func:`export_aoti` (callable)."""
    import protoseg_ext  # noqa: F401  (registers the fused ops the package calls)

    return torch._inductor.aoti_load_package(os.fspath(path))
