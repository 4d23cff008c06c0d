"""Export for inference: ONNX (dynamo and TorchScript exporters, checked in ONNX Runtime), AOTInductor,
and the training script's export command."""

import json

import pytest
import torch

from protoseg_ext import deploy
from protoseg_ext.train.export import SegModel
from protoseg_ext.train.model import ProtoSegNet

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

SHAPES = [(1, 64, 96), (2, 32, 64), (3, 48, 80)]  # (batch, height, width): the export's dynamic dimensions


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = ProtoSegNet(5, proj_dim=16, width=8, num_prototype=3)
    with torch.no_grad():  # LayerNorms away from identity, so a wrong or missing one shows
        for p in (net.head.feat_norm.weight, net.head.feat_norm.bias, net.head.mask_norm.weight,
                  net.head.mask_norm.bias):
            p.add_(0.2 * torch.randn_like(p))
    return SegModel(net).eval()


def _images(b, h, w, seed=1):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _assert_matches(out, ref):
    """Seg logits within 1e-4; the arg-max over classes equal wherever it is not a near tie."""
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 1e-4
    top2 = ref.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4
    assert torch.equal(out.argmax(1)[clear], ref.argmax(1)[clear])


@pytest.fixture(scope="module")
def onnx_file(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    deploy.export_onnx(model, _images(1, 64, 96), path)
    return path


def test_onnx_graph_is_standard_operators_with_dynamic_batch_height_width(onnx_file):
    graph = onnx.load(str(onnx_file)).graph
    assert {n.domain for n in graph.node} <= {"", "ai.onnx"}  # no custom domain: runs without protoseg_ext
    ops = {n.op_type for n in graph.node}
    assert {"LayerNormalization", "ReduceMax"} <= ops
    dims = graph.input[0].type.tensor_type.shape.dim
    assert [bool(d.dim_param) for d in dims] == [True, False, True, True]  # batch, height, width symbolic
    onnx.checker.check_model(str(onnx_file))


@pytest.mark.parametrize("shape", SHAPES)
def test_onnx_runtime_reproduces_pytorch(model, onnx_file, shape):
    images = _images(*shape, seed=sum(shape))
    with torch.no_grad():
        ref = model(images)
    _assert_matches(deploy.run_onnx(onnx_file, images), ref)


def test_check_onnx_reports_the_difference(model, onnx_file):
    worst, differ = deploy.check_onnx(onnx_file, model, [_images(*s) for s in SHAPES])
    assert worst <= 1e-4 and differ <= 1e-3
    other = SegModel(ProtoSegNet(5, proj_dim=16, width=8, num_prototype=3)).eval()  # other weights: it must tell
    worst, differ = deploy.check_onnx(onnx_file, other, [_images(1, 64, 96)])
    assert worst > 1e-2


def test_torchscript_exporter_works_too(model, tmp_path):
    path = tmp_path / "ts.onnx"
    with pytest.warns(Warning):  # the TorchScript exporter is deprecated in torch; it still takes the same path
        torch.onnx.export(model, (_images(2, 64, 96),), str(path), dynamo=False, input_names=["images"],
                          dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}})
    with torch.no_grad():
        for shape in SHAPES[:2]:
            images = _images(*shape)
            _assert_matches(deploy.run_onnx(path, images), model(images))


def test_export_in_training_mode_says_export_is_for_inference(model, tmp_path):
    model.train()
    try:
        with pytest.raises(ValueError, match="export is for inference.*model.eval"):
            deploy.export_onnx(model, _images(1, 32, 32), tmp_path / "x.onnx")
        with pytest.raises(ValueError, match="export is for inference"):
            deploy.export_aoti(model, _images(1, 32, 32), tmp_path / "x.pt2")
        with pytest.raises(Exception, match="exports for inference only"):  # the exporter called directly
            torch.onnx.export(model, (_images(2, 32, 32),), str(tmp_path / "y.onnx"), dynamo=True)
    finally:
        model.eval()


def test_head_refuses_export_with_labels():
    from protoseg_ext import ProtoSegHead

    head = ProtoSegHead(8, 3, 2).eval()

    class WithLabels(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = head

        def forward(self, x, gt):
            return self.head(x, gt).seg

    with pytest.raises(Exception, match="exports for inference only"):
        torch.export.export(WithLabels(), (torch.randn(1, 8, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long)))


def test_aoti_package_runs_the_fused_ops(model, tmp_path):
    example = _images(1, 64, 96)
    program = torch.export.export(model, (example.expand(2, -1, -1, -1).contiguous(),))
    assert any("protoseg_ext" in str(n.target) for n in program.graph.nodes)  # the fused ops, not a decomposition
    path = deploy.export_aoti(model, example, tmp_path / "model.pt2")
    compiled = deploy.load_aoti(path)
    with torch.no_grad():
        for shape in SHAPES:  # the batch of one traced as two: every batch size runs
            images = _images(*shape, seed=7)
            _assert_matches(compiled(images), model(images))


def _train(tmp_path, *extra):
    from protoseg_ext.train.loop import main

    out = tmp_path / "run"
    main(["--out", str(out), "--iters", "2", "--eval-every", "2", "--synthetic-size", "32", "64",
          "--synthetic-count", "4", "4", "--width", "8", "--proj-dim", "16", "--num-pictures", "0",
          "--num-preds", "0", "--no-progress", "--workers", "0", *extra])
    return out


@pytest.mark.parametrize("backbone", ["compact", "hrnet_w18_small_v2"])
def test_export_command_checks_miou_in_onnx_runtime(tmp_path, capsys, backbone):
    from protoseg_ext.train.export import main

    if backbone != "compact":
        pytest.importorskip("timm")
    run = _train(tmp_path, "--backbone", backbone)
    capsys.readouterr()
    result = main(["--checkpoint", str(run / "checkpoint.pt"), "--out", str(tmp_path / "model.onnx")])
    text = capsys.readouterr().out
    assert f"wrote {tmp_path / 'model.onnx'}" in text and "OK" in text
    pt, onx = result["miou"]["pytorch"], result["miou"]["onnxruntime"]
    assert abs(pt - onx) * 100 <= 0.1 and result["images"] == 4
    assert f"PyTorch {pt * 100:.2f}%, ONNX Runtime {onx * 100:.2f}%" in text
    metrics = json.loads((run / "metrics.json").read_text())
    assert abs(metrics["miou"] - pt) < 1e-9  # the command's PyTorch mIoU is the training script's evaluation


def test_export_command_names_a_bad_checkpoint(tmp_path):
    from protoseg_ext.train.export import main

    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match=f"protoseg-export: error: {bad} cannot be read"):
        main(["--checkpoint", str(bad), "--out", str(tmp_path / "m.onnx")])
    assert not (tmp_path / "m.onnx").exists()


def test_readme_deploy_commands_run_as_written(tmp_path):
    """The deploy block of docs/usage.md, in a scratch folder: train, export (ONNX + AOTInductor), check."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    usage = (Path(__file__).resolve().parents[1] / "docs" / "usage.md").read_text()
    block = re.search(r"## Deploying: ONNX and AOTInductor\n\n```bash\n(.*?)```", usage, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.startswith("python ")]
    assert len(commands) == 2 and "--aoti" in commands[1]
    out = ""
    for cmd in commands:
        cmd = cmd.replace("python ", f"{sys.executable} ", 1).replace("runs/demo", str(tmp_path / "demo"))
        proc = subprocess.run(cmd + " --no-progress" * ("train " in cmd), shell=True, capture_output=True,
                              text=True, timeout=1200)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out = proc.stdout
    assert (tmp_path / "demo" / "model.onnx").is_file() and (tmp_path / "demo" / "model.pt2").is_file()
    assert re.search(r"PyTorch \d+\.\d\d%, ONNX Runtime \d+\.\d\d% \(difference 0\.0\d\d points.*: OK", out), out
