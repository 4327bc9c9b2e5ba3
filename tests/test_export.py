"""Export (ONNX + OpenVINO IR), its equivalence gates, the runtime helper and `pipeline predict`.

Real exporters, real ONNX Runtime and OpenVINO sessions, real files on disk.
"""
from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from PIL import Image

from exporters import metadata as md
from exporters.equivalence import (
    Tolerances,
    compare_runner,
    judge,
    randomize_bn_statistics,
)
from exporters.formats import read_metadata
from exporters.onnx import export_onnx
from exporters.openvino import convert_onnx, save_ir
from exporters.errors import GateFailedError
from exporters.runtime import Classifier, InputError
from exporters.verify import record_check, verify_export
from exporters.sessions import RuntimeOptions, open_session
from models import model_names
from models.reparam import build_multibranch_student, fuse_model
from pipeline.stages.export import with_checked_on
from pipeline.training.checkpoint import file_sha256
from tests.conftest import ROOT, clone_run, run_cli, tree_digest

META = {"architecture": "test-arch", "zoo_name": "test", "classes": [f"class {i}" for i in range(10)],
        "input_size": [3, 32, 32], "channel_order": "RGB", "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
QUICK = {"shufflenetv2_x0_5"}


# The wider ShuffleNetV2s are the x0_5 graph with wider convolutions (x1_0 is also exported and gated by every
# run test, through the shared tiny run): one width stands for them, every other architecture is exported here.
SAME_GRAPH_AS_X0_5 = {"shufflenetv2_x1_0", "shufflenetv2_x1_5", "shufflenetv2_x2_0"}


def _student_params():
    return [pytest.param(name, marks=() if name in QUICK else pytest.mark.slow) for name in model_names("student")
            if name not in SAME_GRAPH_AS_X0_5]


@pytest.mark.parametrize("name", _student_params())
def test_every_fused_student_exports_and_meets_the_f32_gates(name, tmp_path):
    multi, arch = build_multibranch_student(name, 10, 32, 2, "multi", "none")
    fused = fuse_model(randomize_bn_statistics(multi, seed=1)).eval()
    meta = md.build({**META, "architecture": arch["torchvision_name"]}, input_name="images", output_name="logits",
                    source_sha256="s" * 64, made_by={"distill": "d" * 16, "fuse": "f" * 16})
    path = export_onnx(fused, tmp_path / "model.onnx", (3, 32, 32), meta)
    onnx.checker.check_model(str(path), full_check=True)
    assert not (tmp_path / "model.onnx.data").exists()  # one self-contained file
    proto = onnx.load(str(path))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch axis
    assert read_metadata(path) == meta
    ir = save_ir(convert_onnx(path, meta), tmp_path / "ir" / "model.xml", compress_to_fp16=False)
    assert read_metadata(ir) == meta

    images = torch.randn(14, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tol = Tolerances()
    for runner_name, runner in (("onnxruntime", open_session(path, "onnxruntime").run),
                                ("openvino f32", open_session(ir, "openvino", RuntimeOptions(precision="f32")).run)):
        for c in compare_runner(runner_name, fused, runner, images, (1, 7)):
            judge(c, tol)
            assert c.passed, (name, c)
            assert c.max_abs_diff <= 1e-4 * max(1.0, c.max_abs_logit)


def test_unknown_exporter_and_low_opset_are_refused(tmp_path):
    from pipeline.errors import ExportError

    model = torch.nn.Conv2d(3, 2, 1)
    with pytest.raises(ExportError, match="valid: dynamo, torchscript"):
        export_onnx(model, tmp_path / "m.onnx", (3, 8, 8), META, exporter="jit")
    with pytest.raises(ExportError, match="opset >= 18"):
        export_onnx(model, tmp_path / "m.onnx", (3, 8, 8), META, opset=13)


# --------------------------------------------------------------------------- the stage, through the CLI

@pytest.fixture(scope="module")
def exported(tiny_run) -> Path:
    """A run directory whose student was trained briefly on real Fashion-MNIST, fused and exported (shared)."""
    return tiny_run


def test_export_stage_writes_gated_self_describing_artifacts(exported):
    export_dir = exported / "export"
    manifest = json.loads((export_dir / "manifest.json").read_text())
    paths = {a["path"] for a in manifest["artifacts"]}
    assert paths == {"model.onnx", "openvino/model.xml", "openvino/model.bin", "openvino/model_fp16.xml",
                     "openvino/model_fp16.bin", "model_int8.onnx", "openvino/model_int8.xml",
                     "openvino/model_int8.bin", "reference.npz"}  # (the INT8 twins: tests/test_int8.py)
    for artifact in manifest["artifacts"]:
        assert file_sha256(export_dir / artifact["path"]) == artifact["sha256"]
        assert artifact["checked_on"] == [platform.machine()], artifact  # the gates ran every file here
    assert manifest["input"]["shape"] == ["batch", 3, 32, 32] and manifest["onnx"]["opset"] == 18
    assert manifest["classes"][0] == "T-shirt/top"

    report = json.loads((export_dir / "equivalence.json").read_text())
    assert report["passed"] and report["images"] == 16  # the tiny profile's export.images
    gated = {c["name"] for c in report["gated"]}
    assert gated == {f"{r}, batch {b}" for r in ("onnxruntime CPU", "openvino CPU f32") for b in (1, 7)}
    assert all(c["passed"] and c["top1_agreement"] == 100.0 for c in report["gated"])
    reported = {c["name"] for c in report["reported"]}
    assert reported == {"openvino CPU default precision, batch 7", "openvino CPU FP16 IR, batch 7"}

    meta = read_metadata(export_dir / "model.onnx")
    assert meta == read_metadata(export_dir / "openvino" / "model.xml") == manifest["metadata"]
    assert meta["source_sha256"] == file_sha256(exported / "fused" / "model.pt")
    recorded = {stage: json.loads((exported / folder / "stage.json").read_text())["settings_hash"]
                for stage, folder in (("distill", "student"), ("fuse", "fused"))}
    assert meta["made_by"] == recorded and all(recorded.values())
    assert meta["architecture"] == "shufflenet_v2_x1_0" and meta["classes"] == manifest["classes"]


def test_export_rerun_skips_when_nothing_changed(exported, fashion_root, tmp_path):
    run = clone_run(exported, tmp_path / "run")
    before = tree_digest(run / "export")
    result = run_cli("export", "--run-dir", str(run), "--data-root", str(fashion_root), "--images", "16",
                     "--calibration-images", "32")  # the run's own settings (the tiny profile's)
    assert result.returncode == 0, result.stderr
    assert "export: artifacts are up to date with the fused student; skipping" in result.stderr
    assert tree_digest(run / "export") == before


def models_digest(folder: Path) -> dict[str, str]:
    """The sha256 of every file of an export folder but its JSON records: the model files and their weights."""
    return {name: digest for name, digest in tree_digest(folder).items() if not name.endswith(".json")}


def test_a_check_on_another_architecture_is_recorded_in_the_manifest_alone(exported, fashion_root, tmp_path):
    """What scripts/arm64-check.sh records after its models met their goals on aarch64: the manifest names the
    architecture for those files and their weights; the files stay byte-identical, verify passes, and the export
    stage still takes its outputs for its own (a rerun skips)."""
    run = clone_run(exported, tmp_path / "run")
    export = run / "export"
    models_before = models_digest(export)
    recorded = record_check(export, "aarch64", ["model_int8.onnx", "openvino/model.xml"])
    assert recorded == ["model_int8.onnx", "openvino/model.xml", "openvino/model.bin"]
    assert record_check(export, "aarch64", ["model_int8.onnx"]) == ["model_int8.onnx"]  # once per architecture
    here = platform.machine()
    checked = {a["path"]: a["checked_on"] for a in json.loads((export / "manifest.json").read_text())["artifacts"]}
    assert {p: archs for p, archs in checked.items() if archs != [here]} == {p: [here, "aarch64"] for p in recorded}
    assert models_digest(export) == models_before
    assert verify_export(export)["passed"] and run_cli("verify", str(export)).returncode == 0
    result = run_cli("export", "--run-dir", str(run), "--data-root", str(fashion_root), "--images", "16",
                     "--calibration-images", "32")
    assert result.returncode == 0, result.stderr
    assert "export: artifacts are up to date with the fused student; skipping" in result.stderr
    assert json.loads((export / "manifest.json").read_text())["artifacts"][0]["checked_on"] == [here]  # model.onnx


def test_recording_a_check_refuses_bad_names_and_changed_files(exported, tmp_path):
    run = clone_run(exported, tmp_path / "run")
    export = run / "export"
    manifest = (export / "manifest.json").read_text()
    with pytest.raises(InputError, match="not a CPU architecture name"):
        record_check(export, "../x86", ["model.onnx"])
    with pytest.raises(InputError, match="openvino/model.bin is not a model file listed"):
        record_check(export, "aarch64", ["openvino/model.bin"])
    (export / "model_int8.onnx").unlink()  # a hard link to the original's file: replaced, not written into
    (export / "model_int8.onnx").write_bytes((exported / "export" / "model_int8.onnx").read_bytes() + b"\0")
    with pytest.raises(GateFailedError, match="does not match manifest.json"):
        record_check(export, "aarch64", ["model.onnx"])  # the record would vouch for bytes nobody checked
    assert (export / "manifest.json").read_text() == manifest


def test_verify_record_adds_this_machines_architecture_to_an_older_manifest(exported, tmp_path):
    """A manifest written before artifacts named their architectures: `python -m exporters verify --record` on the
    device adds the one it runs on to every model it opened."""
    run = clone_run(exported, tmp_path / "run")
    export = run / "export"
    manifest = json.loads((export / "manifest.json").read_text())
    for artifact in manifest["artifacts"]:
        del artifact["checked_on"]
    (export / "manifest.json").unlink()
    (export / "manifest.json").write_text(json.dumps(manifest))
    result = subprocess.run([sys.executable, "-m", "exporters", "verify", "--record", str(export)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"recorded in manifest.json: checked on {platform.machine()} (8 files)" in result.stdout
    assert {a["path"]: a.get("checked_on") for a in json.loads((export / "manifest.json").read_text())["artifacts"]} \
        == {**{name: [platform.machine()] for name in MODELS_AND_WEIGHTS}, "reference.npz": None}  # answers: no model


MODELS_AND_WEIGHTS = ("model.onnx", "openvino/model.xml", "openvino/model.bin", "openvino/model_fp16.xml",
                      "openvino/model_fp16.bin", "model_int8.onnx", "openvino/model_int8.xml",
                      "openvino/model_int8.bin")
MODELS = ("model.onnx", "openvino/model.xml", "openvino/model_fp16.xml", "model_int8.onnx", "openvino/model_int8.xml")


def test_the_export_writes_reference_answers_that_verify_matches_here(exported):
    """reference.npz: the 32 reference images (float32, preprocessed) and each model file's logits and top-1, read
    without pickles; verify on the export machine finds every model giving its reference answers."""
    export = exported / "export"
    with np.load(export / "reference.npz", allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    assert set(arrays) == {"inputs", *(f"{kind}/{name}" for kind in ("logits", "top1") for name in MODELS)}
    assert arrays["inputs"].shape == (32, 3, 32, 32) and arrays["inputs"].dtype == np.float32
    for name in MODELS:
        assert arrays[f"logits/{name}"].shape == (32, 10)
        assert (arrays[f"top1/{name}"] == arrays[f"logits/{name}"].argmax(1)).all()
    report = verify_export(export)
    assert report["reference"] == {"path": "reference.npz", "images": 32}
    assert {Path(row["path"]).relative_to(export).as_posix(): (row["reference"]["agree"], row["reference"]["met"])
            for row in report["models"]} == {name: (32, True) for name in MODELS}
    assert all(row["reference"]["max_abs_diff"] < 1e-3 for row in report["models"])  # same machine, same runtimes
    result = subprocess.run([sys.executable, "-m", "exporters", "verify", str(export)], capture_output=True,
                            text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"ok  {export / 'model_int8.onnx'}: top-1 agrees with its reference answers on 32/32 images (100.0%, " \
           "goal 99.5%)" in result.stdout


def test_reference_answers_are_reproducible_and_never_unpickled(tmp_path):
    """The same answers give the same bytes (fixed zip timestamps); an archive with a pickled array, or answers
    whose top-1 is not what their logits imply, is one InputError line."""
    import zipfile

    from exporters.reference import read_reference, write_reference

    rng = np.random.default_rng(0)
    inputs, logits = rng.standard_normal((4, 3, 8, 8), dtype=np.float32), rng.standard_normal((4, 10)).astype("f4")
    write_reference(tmp_path / "a.npz", inputs, {"model.onnx": logits})
    with zipfile.ZipFile(tmp_path / "a.npz") as archive:
        assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    write_reference(tmp_path / "b.npz", inputs, {"model.onnx": logits})
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    assert (read_reference(tmp_path / "a.npz", [3, 8, 8], 10).top1["model.onnx"] == logits.argmax(1)).all()
    np.savez(tmp_path / "pickled.npz", inputs=np.array([object()], dtype=object))
    with pytest.raises(InputError, match="pickled.npz is unreadable"):
        read_reference(tmp_path / "pickled.npz", [3, 8, 8], 10)
    np.savez(tmp_path / "wrong.npz", inputs=inputs, **{"logits/model.onnx": logits,
                                                       "top1/model.onnx": (logits.argmax(1) + 1) % 10})
    with pytest.raises(InputError, match="answers of 'model.onnx' are not 4 x 10 finite float32 logits"):
        read_reference(tmp_path / "wrong.npz", [3, 8, 8], 10)


def _change_reference(export: Path, name: str, images: int) -> None:
    """Rewrite reference.npz with the top-1 of model file ``name`` moved to another class on its first ``images``
    images, and list its new sha256 in the manifest: the hash check passes, the answers do not."""
    from exporters.reference import write_reference

    with np.load(export / "reference.npz", allow_pickle=False) as npz:
        logits = {key.removeprefix("logits/"): npz[key] for key in npz.files if key.startswith("logits/")}
        inputs = npz["inputs"]
    changed = logits[name].copy()
    for i in range(images):
        changed[i, (changed[i].argmax() + 1) % changed.shape[1]] = changed[i].max() + 1.0
    (export / "reference.npz").unlink()  # a hard link to the fixture's file: replaced, never written into
    write_reference(export / "reference.npz", inputs, {**logits, name: changed})
    _relist(export, "reference.npz")


def _relist(export: Path, name: str) -> None:
    """The manifest entry of ``name`` rewritten to the file's current size and sha256."""
    manifest_path = export / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["artifacts"]:
        if entry["path"] == name:
            entry.update(sha256=file_sha256(export / name), bytes=(export / name).stat().st_size)
    manifest_path.unlink()
    manifest_path.write_text(json.dumps(manifest))


def _runtime_verify(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exporters", "verify", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_verify_record_records_only_the_models_that_met_their_reference_answers(exported, tmp_path):
    """An INT8 file whose reference top-1 differs on 4 of 32 images misses its goal (99.5%): verify says so and
    passes, and --record leaves that file (and only it) unrecorded."""
    export = clone_run(exported, tmp_path / "run") / "export"
    _change_reference(export, "model_int8.onnx", 4)
    manifest = json.loads((export / "manifest.json").read_text())
    for artifact in manifest["artifacts"]:
        del artifact["checked_on"]  # as a manifest this architecture never checked
    (export / "manifest.json").unlink()
    (export / "manifest.json").write_text(json.dumps(manifest))
    result = _runtime_verify("--record", str(export))
    assert result.returncode == 0, result.stderr
    assert f"MISS  {export / 'model_int8.onnx'}: does not match its reference answers here: top-1 agrees with its " \
           "reference answers on 28/32 images (87.5%, goal 99.5%)" in result.stdout
    assert "not recorded (did not match their reference answers here): model_int8.onnx" in result.stdout
    assert f"checked on {platform.machine()} (7 files)" in result.stdout
    checked = {a["path"]: a.get("checked_on") for a in json.loads((export / "manifest.json").read_text())["artifacts"]}
    assert checked == {**{name: [platform.machine()] for name in MODELS_AND_WEIGHTS}, "model_int8.onnx": None,
                       "reference.npz": None}


def test_a_float_model_that_misses_its_reference_answers_fails_verify(exported, tmp_path):
    export = clone_run(exported, tmp_path / "run") / "export"
    _change_reference(export, "openvino/model_fp16.xml", 1)
    manifest_before = (export / "manifest.json").read_text()
    result = _runtime_verify("--record", str(export))
    assert result.returncode == 3, result.stderr
    assert "error: float answers changed on this machine: " in result.stderr
    assert "model_fp16.xml does not match its reference answers here: top-1 agrees with its reference answers " \
           "on 31/32 images (96.9%, goal 100%)" in result.stderr
    assert (export / "manifest.json").read_text() == manifest_before  # nothing recorded


def test_verify_record_refuses_a_folder_without_reference_answers(exported, tmp_path):
    """A folder exported before reference answers: verify still runs each model on noise and says it compared
    nothing; --record refuses (exit 2), since nothing it could record was compared."""
    export = clone_run(exported, tmp_path / "run") / "export"
    manifest = json.loads((export / "manifest.json").read_text())
    manifest["artifacts"] = [a for a in manifest["artifacts"] if a["path"] != "reference.npz"]
    (export / "manifest.json").unlink()
    (export / "manifest.json").write_text(json.dumps(manifest))
    (export / "reference.npz").unlink()
    result = _runtime_verify(str(export))
    assert result.returncode == 0, result.stderr
    assert "--  no reference answers (reference.npz) in this folder" in result.stdout
    assert f"ok  {export / 'model.onnx'}: (2, 3, 32, 32) -> (2, 10) finite logits" in result.stdout
    result = _runtime_verify("--record", str(export))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {export} has no reference answers (reference.npz) to check its models " \
        "against, so nothing can be recorded as checked here: re-export the folder with this version"
    assert json.loads((export / "manifest.json").read_text()) == manifest


def test_a_reexport_keeps_the_architectures_of_unchanged_bytes_only():
    here = platform.machine()
    previous = {"artifacts": [{"path": "model.onnx", "sha256": "a" * 64, "checked_on": [here, "riscv64"]},
                              {"path": "model_int8.onnx", "sha256": "b" * 64, "checked_on": ["riscv64"]}]}
    fresh = [{"path": "model.onnx", "sha256": "a" * 64}, {"path": "model_int8.onnx", "sha256": "c" * 64}]
    assert [a["checked_on"] for a in with_checked_on(fresh, previous)] == [[here, "riscv64"], [here]]
    assert [a["checked_on"] for a in with_checked_on(fresh, {"artifacts": "garbled"})] == [[here], [here]]


def _perturb_classifier(path: Path) -> None:
    """Nudge the weights of one class in the classifier (the only 2-D initializer) by 0.01."""
    proto = onnx.load(str(path))
    init = next(t for t in proto.graph.initializer if len(t.dims) == 2)
    weights = onnx.numpy_helper.to_array(init).copy()
    weights[0 if weights.shape[0] == 10 else slice(None), 0 if weights.shape[0] != 10 else slice(None)] += 0.01
    init.CopyFrom(onnx.numpy_helper.from_array(weights, init.name))
    path.unlink()  # may be a hard link to a fixture's file: replace it, never edit it
    onnx.save(proto, str(path))


def test_a_perturbed_weight_in_the_exported_file_fails_the_gate(exported, fashion_root, tmp_path):
    run_dir = tmp_path / "run"
    clone_run(exported, run_dir)
    _perturb_classifier(run_dir / "export" / "model.onnx")
    # an export that went wrong (not a file corrupted later): its manifest lists the wrong file's sha256
    _relist(run_dir / "export", "model.onnx")
    result = run_cli("export", "--verify", "--formats", "onnx", "--run-dir", str(run_dir), "--data-root",
                     str(fashion_root), "--images", "16")
    assert result.returncode == 3, result.stderr
    assert "error: export equivalence gate failed: onnxruntime CPU, batch 1" in result.stderr
    assert json.loads((run_dir / "export" / "verify.json").read_text())["passed"] is False
    # the untouched original still verifies
    result = run_cli("export", "--verify", "--run-dir", str(exported), "--data-root", str(fashion_root))
    assert result.returncode == 0, result.stderr


def _fashion_pngs(folder: Path, count: int) -> tuple[list[Path], torch.Tensor]:
    from pipeline.training.data import load_dataset

    bundle = load_dataset("fashion-mnist", None, False, 32)
    folder.mkdir(parents=True, exist_ok=True)
    files, raw = [], []
    for i in range(count):
        image = bundle.test[i][0]
        raw.append(image)
        files.append(folder / f"test_{i}.png")
        Image.fromarray(image.numpy()[0]).save(files[-1])
    return files, torch.stack(raw)


@pytest.mark.parametrize("artifact", ["model.onnx", "openvino/model.xml"])
def test_predict_on_real_images_agrees_with_the_pytorch_model(exported, tmp_path, artifact):
    from pipeline.layout import RunLayout
    from pipeline.stages.loaders import load_fused
    from pipeline.training.data import BatchPreprocessor

    files, raw = _fashion_pngs(tmp_path / "images", 12)
    model, info = load_fused(RunLayout(exported))
    with torch.no_grad():
        probs = torch.softmax(model(BatchPreprocessor(32, info["mean"], info["std"])(raw)), 1)
    result = run_cli("predict", "--model", str(exported / "export" / artifact), "--json", "--top-k", "3",
                     *map(str, files))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [p["image"] for p in lines] == [str(f) for f in files]
    assert [p["index"] for p in lines] == probs.argmax(1).tolist()
    assert [p["label"] for p in lines] == [info["classes"][i] for i in probs.argmax(1).tolist()]
    np.testing.assert_allclose([p["probability"] for p in lines], probs.max(1).values.numpy(), atol=1e-4)
    assert all(len(p["top"]) == 3 for p in lines)


def test_runtime_helper_rejects_wrong_inputs_clearly(exported, tmp_path):
    clf = Classifier(exported / "export" / "model.onnx")
    good = np.zeros((2, 3, 32, 32), np.float32)
    assert clf.logits(good).shape == (2, 10)
    with pytest.raises(InputError, match=r"input has 1 channels .* the model takes N x 3 x 32 x 32"):
        clf.logits(np.zeros((2, 1, 32, 32), np.float32))
    with pytest.raises(InputError, match=r"input is 28x28 pixels"):
        clf.logits(np.zeros((2, 3, 28, 28), np.float32))
    with pytest.raises(InputError, match=r"input has shape \(3, 32, 32\)"):
        clf.logits(np.zeros((3, 32, 32), np.float32))
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(InputError, match="cannot read image .*notes.txt"):
        clf.classify([tmp_path / "notes.txt"])
    bare = tmp_path / "bare.onnx"
    shutil.copy(exported / "bench" / "onnx" / "stock.onnx" if (exported / "bench").exists()
                else exported / "export" / "model.onnx", bare)
    proto = onnx.load(str(bare))
    del proto.metadata_props[:]
    onnx.save(proto, str(bare))
    with pytest.raises(InputError, match="carries no pipeline metadata"):
        Classifier(bare)


def test_predict_cli_bad_input(exported, tmp_path):
    result = run_cli("predict", "--model", str(exported / "fused" / "model.pt"), "x.png")
    assert result.returncode == 2 and "unknown model format '.pt'; valid: .onnx" in result.stderr
    result = run_cli("predict", "--model", str(exported / "export" / "model.onnx"), str(tmp_path / "missing.png"))
    assert result.returncode == 2 and "missing.png does not exist" in result.stderr


def test_export_bad_input(exported, tmp_path):
    result = run_cli("export", "--run-dir", str(exported), "--formats", "onnx,tflite")
    assert result.returncode == 2 and "unknown export format(s) tflite; valid: onnx, openvino" in result.stderr
    result = run_cli("export", "--run-dir", str(tmp_path / "empty"))
    assert result.returncode == 2 and "run `pipeline fuse` first" in result.stderr


def test_bench_measures_cpu_targets_and_explains_missing_gpu_ones(exported, tmp_path):
    run_dir = tmp_path / "run"
    clone_run(exported, run_dir)
    result = run_cli("bench", "--run-dir", str(run_dir), "--bench-device", "all", "--batch-sizes", "1,3",
                     "--iterations", "4", "--warmup", "1", "--threads", "1")
    assert result.returncode == 0, result.stderr
    assert "p50 ms" in result.stdout and "fused/stock" in result.stdout
    latency = json.loads((run_dir / "bench" / "latency.json").read_text())
    assert latency["budget"]["threads"] == 1 and latency["machine"]["usable_cores"] >= 1
    assert latency["machine"]["cpu"] and isinstance(latency["machine"]["isa"], list)
    rows = latency["results"]
    cpu = [r for r in rows if r["device"] == "cpu"]
    assert {(r["backend"], r["variant"], r["batch"]) for r in cpu} == {
        (b, v, n) for b in ("torch", "onnxruntime", "openvino") for v in ("fused", "unfused", "stock") for n in (1, 3)
    } | {(b, "int8", n) for b in ("onnxruntime", "openvino") for n in (1, 3)}  # the export's INT8 files: no torch
    for r in cpu:
        assert r["status"] == "ok" and r["iterations"] >= 4 and 0 < r["p50_ms"] <= r["p99_ms"]
        assert r["throughput_ips"] > 0 and r["threads"] == 1
    cuda = [r for r in rows if r["device"] == "cuda"]
    assert cuda, "GPU targets must be reported, not silently dropped"
    if not torch.cuda.is_available():
        assert all(r["status"] == "skipped" and r["reason"] for r in cuda)
    assert {q["ratio"] for q in latency["ratios"]} == {"fused/stock", "fused/unfused", "int8/fused"}


def test_bench_bad_input(exported):
    result = run_cli("bench", "--run-dir", str(exported), "--backends", "torch,tensorflow")
    assert result.returncode == 2 and "unknown backend tensorflow; valid: torch, onnxruntime, openvino" in result.stderr
    result = run_cli("bench", "--run-dir", str(exported), "--batch-sizes", "1,x")
    assert result.returncode == 2 and "batch sizes must be integers" in result.stderr


def test_the_bench_exports_a_variant_again_only_when_its_model_or_file_changed(tmp_path):
    from pipeline.stages.bench import export_variant_onnx

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(10)).eval()
    model(torch.randn(1, 3, 8, 8))  # materialise the lazy layer
    meta, path = {"architecture": "toy", "input_size": [3, 8, 8]}, tmp_path / "unfused.onnx"
    export_variant_onnx(model, path, meta)
    first = path.stat()
    export_variant_onnx(model, path, meta)
    assert path.stat().st_ino == first.st_ino and path.stat().st_mtime_ns == first.st_mtime_ns  # reused

    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] += 1.0  # another model: exported again, with its weights
    export_variant_onnx(model, path, meta)
    assert path.stat().st_ino != first.st_ino
    ones = np.ones((1, 3, 8, 8), np.float32)

    def run_file() -> np.ndarray:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: ones})[0]

    expected = model(torch.from_numpy(ones)).detach().numpy()
    np.testing.assert_allclose(run_file(), expected, rtol=1e-4, atol=1e-5)

    damaged = tmp_path / "damaged.onnx"
    damaged.write_bytes(path.read_bytes()[:100])
    damaged.replace(path)  # a damaged file is never reused
    export_variant_onnx(model, path, meta)
    np.testing.assert_allclose(run_file(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("location", ["../outside.data", "/etc/passwd", ""])
def test_external_data_outside_the_export_folder_is_refused(tmp_path, location):
    """The manifest lists and hashes the files a model's external data names: never one outside its folder."""
    import onnx
    from onnx import TensorProto, helper

    from pipeline.errors import BadInputError
    from pipeline.layout import StageFolder
    from pipeline.stages.export import external_data_files

    weight = helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0])
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    weight.external_data.add(key="location", value=location)
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [weight])
    onnx.save_model(helper.make_model(graph), str(tmp_path / "model.onnx"))
    with pytest.raises(BadInputError, match="outside its folder"):
        external_data_files(StageFolder(tmp_path), ["model.onnx"])
