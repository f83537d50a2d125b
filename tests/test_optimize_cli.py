"""`kiln optimize` input validation and `analyze`: every bad input is exit code 2 and one readable line."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
from typer.testing import CliRunner  # noqa: E402

from optimize.cli import app  # noqa: E402
from tests.kiln_server import DEFAULT_REPO  # noqa: E402

MODEL = DEFAULT_REPO / "digits-cnn"
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def assert_clean_error(result, *fragments: str, code: int = 2) -> None:
    err = result.stderr.strip()
    assert result.exit_code == code, (result.exit_code, result.output)
    assert len(err.splitlines()) == 1, err  # one readable line
    assert err.startswith("error: "), err
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in err, err


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "junk.onnx").write_bytes(b"\x00\x01not a protobuf at all" * 10)
    (d / "broken.pt2").write_bytes(b"not a zip")
    (d / "model.txt").write_text("hello")
    np.savez(d / "wrong_shape.npz", input=np.zeros((4, 1, 7, 7), np.float32))
    np.savez(d / "wrong_dtype.npz", input=np.zeros((4, 1, 8, 8), np.float64))
    np.savez(d / "wrong_key.npz", images=np.zeros((4, 1, 8, 8), np.float32))
    (d / "not_npz.npz").write_text("nope")
    (d / "empty_folder").mkdir()
    return d


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["analyze", "no/such/model.onnx"], ["no such file"]),
        (["analyze", "{bad}/model.txt"], ["unsupported model format"]),
        (["analyze", "{bad}/junk.onnx"], ["not a valid ONNX model"]),
        (["analyze", "{bad}/broken.pt2"], ["not a valid .pt2"]),
        (["analyze", "{bad}/empty_folder"], ["not a model folder"]),
        (["analyze", "{model}", "--format", "tflite"], ["--format"]),
        (["prune", "{model}", "--method", "random", "--amount", "0.3"], ["--method"]),
        (["prune", "{model}", "--method", "channel", "--amount", "1.5"], ["--amount", "(0, 1)"]),
        (["prune", "{model}", "--method", "channel", "--amount", "0"], ["--amount"]),
        (["prune", "{model}", "--method", "channel", "--amount", "0.3", "--finetune-epochs", "-1"], ["--finetune-epochs"]),
        (["quantize", "{model}", "--backend", "tpu9000", "--mode", "static"], ["unknown backend"]),
        (["quantize", "{model}", "--backend", "onnxruntime", "--mode", "sometimes"], ["--mode"]),
        (["quantize", "{model}", "--backend", "openvino", "--mode", "dynamic"], ["dynamic", "ONNX Runtime"]),
        (["quantize", "{model}", "--backend", "onnxruntime", "--calib", "{bad}/wrong_shape.npz"], ["shape", "[-1, 1, 8, 8]"]),
        (["quantize", "{model}", "--backend", "onnxruntime", "--calib", "{bad}/wrong_dtype.npz"], ["float64", "float32"]),
        (["quantize", "{model}", "--backend", "onnxruntime", "--calib", "{bad}/wrong_key.npz"], ["arrays ['images']", "do not match the model's inputs ['input']"]),
        (["quantize", "{model}", "--backend", "onnxruntime", "--calib", "{bad}/not_npz.npz"], ["not a readable .npz"]),
        (["quantize", "{model}", "--backend", "onnxruntime", "--calib", "{bad}/missing.npz"], ["--calib", "missing.npz: file not found"]),
        (["quantize", "{model}/1/model.onnx", "--backend", "onnxruntime", "--calib", "{bad}/missing.npz"], ["not found"]),
        (["distill", "--teacher", "{model}", "--student", "big"], ["--student"]),
        (["distill", "--teacher", "{model}", "--student", "8,16:32", "--alpha", "1.5"], ["--alpha"]),
        (["distill", "--teacher", "{model}", "--student", "8,16:32", "--temperature", "0"], ["--temperature"]),
        (["distill", "--teacher", "no/such/dir", "--student", "8,16"], ["no such file"]),
        (["search", "tests/byom_models.py:mlp", "--data", "tests/byom_models.py:wine_data", "--budget-ms", "-1"], ["--budget-ms"]),
        (["search", "tests/byom_models.py:mlp", "--data", "tests/byom_models.py:wine_data", "--budget-ms", "1", "--backend", "nope"], ["unknown backend"]),
        (["search", "tests/byom_models.py:mlp", "--data", "tests/byom_models.py:wine_data", "--budget-ms", "1", "--batch", "64"], ["--batch"]),
        (["report", "{model}", "--max-drop", "-1"], ["--max-drop"]),
        (["report", "{model}", "--min-speedup", "0.5"], ["--min-speedup"]),
        (["report", "{model}", "--backends", "nope"], ["unknown backend"]),
    ],
)
def test_bad_input_is_one_line_exit_2(args, fragments, bad_files, tmp_path):
    args = [a.format(bad=bad_files, model=MODEL) for a in args]
    if args[0] in ("prune", "quantize", "distill", "search", "report"):
        args += ["--out", str(tmp_path / "out")]
    assert_clean_error(invoke(*args), *fragments)


def test_analyze_onnx_and_pt2(tmp_path):
    for fmt in ("onnx", "pt2"):
        out = tmp_path / f"a-{fmt}.json"
        result = invoke("analyze", MODEL, "--format", fmt, "--json", out)
        assert result.exit_code == 0, result.output
        assert "91,776" in result.output and "13,706" in result.output  # MACs and parameters of digits-cnn
        import json

        data = json.loads(out.read_text())
        assert data["params"] == 13_706 and data["macs"] == 91_776 and data["flops"] == 2 * 91_776
        assert data["size_bytes"] == (MODEL / "1" / f"model.{fmt}").stat().st_size
        convs = [lay for lay in data["layers"] if lay["op"].lower().startswith("conv")]
        assert [c["macs"] for c in convs] == [9_216, 73_728]
        assert data["peak_activation_bytes"] == 16 * 8 * 8 * 4


def test_cpu_recipe_choice_from_cpuinfo():
    from backends import hw

    avx2 = hw.detect("model name\t: Old Xeon\nflags\t\t: fpu sse avx avx2 fma\n")
    assert avx2.isa["avx2"] and not avx2.int8_dot
    assert hw.choose_recipe("onnxruntime", "static", avx2).extra["reduce_range"] is True
    vnni = hw.detect("model name\t: New Xeon\nflags\t\t: avx2 avx512f avx512_vnni amx_tile amx_int8\n")
    rec = hw.choose_recipe("onnxruntime", "static", vnni)
    assert rec.extra["reduce_range"] is False and "AMX" in rec.reason
    assert hw.auto_backend(vnni, ["onnxruntime", "openvino"])[0] == "openvino"
    arm = hw.detect("Features\t: fp asimd evtstrm aes asimddp i8mm\nCPU part\t: 0xd40\n")
    assert arm.isa["arm_dotprod"] and arm.isa["arm_i8mm"]
    assert hw.auto_backend(arm, ["onnxruntime", "litert"])[0] == "litert"
    assert hw.auto_backend(avx2, ["onnxruntime", "openvino"])[0] == "onnxruntime"
    assert "ARM dot-product" in hw.choose_recipe("litert", "static", arm).reason


def test_kiln_help_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; from service.cli import app; from typer.testing import CliRunner; "
            "r = CliRunner().invoke(app, ['optimize', '--help']); assert r.exit_code == 0, r.output; "
            "assert 'prune' in r.output and 'report' in r.output; "
            "assert 'torch' not in sys.modules, 'torch imported by kiln --help'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(MODEL.parent.parent))
