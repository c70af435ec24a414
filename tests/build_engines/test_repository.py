from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from build_engines import gate
from build_engines.base import F32, Built, Source
from build_engines.build import build_model
from build_engines.spec import ModelSpec, ServingSpec
from setsuna import manifest, model_config
from setsuna.errors import ConfigError, GateError
from setsuna.model_config import CONFIG_NAME
from setsuna.model_config import parse as parse_config
from tests.helpers import logistic_candidate, logistic_source

RNG = np.random.default_rng(1)
W = RNG.normal(size=5).astype(np.float32)
X = RNG.normal(size=(1000, 5)).astype(np.float32)
FAST = gate.GateSettings(latency_calls=20, batch_budget_s=0.01)


def _converter(b: float) -> object:
    def convert(source: Source, workdir: Path, calib: F32) -> list[Built]:
        return [logistic_candidate(workdir / "onnx", W, b)]

    return convert


def _build(tmp_path: Path, b: float = 0.0, **serving: object) -> Path:
    spec = ModelSpec("logit", gate=FAST, serving=ServingSpec(**serving))  # type: ignore[arg-type]
    build_model(
        logistic_source(W, 0.0),
        X,
        spec,
        tmp_path / "repo",
        ("local", "container"),
        tmp_path / "work",
        converter=_converter(b),
        echo=False,  # type: ignore[arg-type]
    )
    return tmp_path / "repo"


def test_both_targets_parse_under_tritons_schema(tmp_path: Path) -> None:
    repo = _build(tmp_path, max_queue_delay_us=250, cpu_instances=3)
    cached = _build(tmp_path / "cached", response_cache=True)
    assert parse_config(
        (cached / "local" / "logit" / CONFIG_NAME).read_text()
    ).response_cache.enable
    local = parse_config((repo / "local" / "logit" / CONFIG_NAME).read_text())
    container = parse_config((repo / "container" / "logit" / CONFIG_NAME).read_text())
    assert local.backend == "python" and not local.platform
    assert container.platform == "onnxruntime_onnx"
    assert container.parameters["intra_op_thread_count"].string_value == "1"
    for cfg in (local, container):
        assert cfg.max_batch_size == 1024
        assert [i.name for i in cfg.input] == ["features"] and list(cfg.input[0].dims) == [5]
        assert [o.name for o in cfg.output] == ["score"] and list(cfg.output[0].dims) == [1]
        assert cfg.dynamic_batching.max_queue_delay_microseconds == 250
        # Never a queue policy beside dynamic batching: it stalls Triton 2.51's batcher.
        assert not cfg.dynamic_batching.HasField("default_queue_policy")
        assert model_config.batching_hazards(cfg) == []
        assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
        assert cfg.instance_group[0].count == 3
        assert not cfg.response_cache.enable  # off: 2.51 caches error responses
        assert cfg.version_policy.WhichOneof("policy_choice") == "all"
        assert cfg.model_warmup[0].inputs["features"].zero_data


def test_version_folders_carry_verified_manifest_and_report(tmp_path: Path) -> None:
    repo = _build(tmp_path)
    local = repo / "local" / "logit" / "1"
    m = manifest.verify(local)
    assert set(m.files) == {"model.onnx", "model.py", "gate_report.json", "gate_report.md"}
    assert m.engine == "onnxruntime" and not m.schema.allow_nan
    assert m.gate["figures"]["identical_decisions"] == 1.0
    report = json.loads((local / "gate_report.json").read_text())
    assert report["published"] == {"local": "onnx", "container": "onnx"}
    assert "TritonPythonModel" in (local / "model.py").read_text()
    manifest.verify(repo / "container" / "logit" / "1")
    assert not list(repo.rglob("*.pkl")) and not list(repo.rglob("*.pickle"))


def test_a_target_with_no_survivor_raises_and_publishes_nothing(tmp_path: Path) -> None:
    with pytest.raises(GateError, match=r"gate_report\.md"):
        _build(tmp_path, b=0.5)
    assert not (tmp_path / "repo").exists()
    assert (tmp_path / "work" / "logit" / "gate_report.md").is_file()


def test_a_config_the_schema_rejects_names_the_field() -> None:
    with pytest.raises(ConfigError, match="max_batch_sise"):
        parse_config('name: "m"\nmax_batch_sise: 8\n')


@pytest.mark.parametrize(
    "serving",
    [
        {"max_batch_size": 0},
        {"preferred_batch_sizes": (2048,)},
        {"max_queue_delay_us": -1},
        {"cpu_instances": 0},
    ],
)
def test_bad_serving_settings_are_refused(serving: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        ServingSpec(**serving)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["Bad", "1x", "a-b", ""])
def test_bad_model_names_are_refused(name: str) -> None:
    with pytest.raises(ConfigError):
        ModelSpec(name)


def test_fil_and_tensorrt_container_configs_parse(tmp_path: Path) -> None:
    from google.protobuf import text_format

    from build_engines.base import Candidate, ContainerSpec
    from build_engines.repository import build_config

    spec = ModelSpec("trees", serving=ServingSpec(gpu_instances=2))
    shape = logistic_source(W, 0.0).schema.row_shape
    fil = Candidate(
        "fil",
        "",
        tmp_path,
        local=False,
        gate_engine="gtil",
        container=ContainerSpec(
            "model.txt",
            backend="fil",
            parameters={"model_type": "lightgbm", "output_class": "true", "predict_proba": "true"},
        ),
    )
    trt = Candidate(
        "tensorrt-fp16",
        "tensorrt",
        tmp_path,
        container=ContainerSpec("model.plan", platform="tensorrt_plan", gpu=True),
    )
    cfg = parse_config(text_format.MessageToString(build_config(spec, shape, fil, "container")))
    assert cfg.backend == "fil" and cfg.default_model_filename == "model.txt"
    assert [i.name for i in cfg.input] == ["input__0"]
    assert [(o.name, list(o.dims)) for o in cfg.output] == [("output__0", [2])]
    assert cfg.parameters["model_type"].string_value == "lightgbm"
    assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    cfg = parse_config(text_format.MessageToString(build_config(spec, shape, trt, "container")))
    assert cfg.platform == "tensorrt_plan"
    assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert cfg.instance_group[0].count == 2
    with pytest.raises(ConfigError, match="local target"):
        build_config(spec, shape, fil, "local")


@pytest.mark.parametrize(
    "extra",
    [
        "default_queue_policy { max_queue_size: 4096 }",
        "default_queue_policy { default_timeout_microseconds: 50000 timeout_action: REJECT }",
        "priority_levels: 2 default_priority_level: 1",
        "default_queue_policy { allow_timeout_override: true }",
    ],
)
def test_batching_with_a_queue_policy_is_named_as_the_stall_cause(extra: str) -> None:
    cfg = parse_config(f'name: "m"\nmax_batch_size: 8\ndynamic_batching {{ {extra} }}\n')
    (hazard,) = model_config.batching_hazards(cfg)
    assert "payload pre-fetching off" in hazard and "500 ms" in hazard
    plain = parse_config('name: "m"\nmax_batch_size: 8\ndynamic_batching { }\n')
    assert model_config.batching_hazards(plain) == []


def test_the_gpu_variant_runs_every_engine_on_the_gpu_and_the_cpu_one_none(
    tmp_path: Path,
) -> None:
    """container-gpu: KIND_GPU everywhere, ORT with its TensorRT provider; container: CPUs only."""
    spec = ModelSpec("logit", gate=FAST, serving=ServingSpec(gpu_instances=2))
    build_model(
        logistic_source(W, 0.0),
        X,
        spec,
        tmp_path / "repo",
        ("local", "container", "container-gpu"),
        tmp_path / "work",
        converter=_converter(0.0),
        echo=False,  # type: ignore[arg-type]
    )
    gpu = model_config.load(tmp_path / "repo" / "container-gpu" / "logit" / CONFIG_NAME)
    cpu = model_config.load(tmp_path / "repo" / "container" / "logit" / CONFIG_NAME)
    assert gpu.platform == cpu.platform == "onnxruntime_onnx"
    assert [(g.kind, g.count) for g in gpu.instance_group] == [(mc.ModelInstanceGroup.KIND_GPU, 2)]
    assert [g.kind for g in cpu.instance_group] == [mc.ModelInstanceGroup.KIND_CPU]
    (accel,) = gpu.optimization.execution_accelerators.gpu_execution_accelerator
    assert accel.name == "tensorrt" and accel.parameters["precision_mode"] == "FP32"
    assert not cpu.optimization.execution_accelerators.gpu_execution_accelerator
    manifest.verify(tmp_path / "repo" / "container-gpu" / "logit" / "1")
    # The two differ only in where they run.
    for c in (gpu, cpu):
        del c.instance_group[:]
        c.ClearField("optimization")
    assert gpu == cpu


def test_the_cpu_container_never_picks_a_gpu_plan_and_the_gpu_one_prefers_it(
    tmp_path: Path,
) -> None:
    from build_engines.base import Candidate, ContainerSpec
    from build_engines.build import choose

    onnx = logistic_candidate(tmp_path / "onnx", W, 0.0)
    fil = Candidate(
        "fil", "", tmp_path, local=False, gate_engine="gtil",
        container=ContainerSpec("model.txt", backend="fil"),
    )  # fmt: skip
    trt = Candidate(
        "tensorrt-fp16", "tensorrt", tmp_path,
        container=ContainerSpec("model.plan", platform="tensorrt_plan", gpu=True),
    )  # fmt: skip
    passed = gate.Figures(
        name="x", engine="", max_abs_diff=0.0, identical_decisions=1.0, p50_us=1.0, p99_us=1.0,
        per_row_us_at_32=1.0, rows_per_s_at_1024=1.0, load_mib=1.0, size_bytes=1, passed=True,
    )  # fmt: skip
    figures = {c.name: passed for c in (onnx, fil, trt)}
    assert choose([onnx, fil, trt], figures, "container", "latency") is fil
    assert choose([onnx, trt], figures, "container", "latency") is onnx
    assert choose([trt], figures, "container", "latency") is None
    assert choose([onnx, fil, trt], figures, "container-gpu", "latency") is trt
    assert choose([onnx, fil], figures, "container-gpu", "latency") is fil


def test_an_int8_graph_stays_on_cuda_without_tensorrt(tmp_path: Path) -> None:
    from google.protobuf import text_format

    from build_engines.base import Candidate, ContainerSpec
    from build_engines.repository import build_config

    spec = ModelSpec("mlp")
    shape = logistic_source(W, 0.0).schema.row_shape
    int8 = Candidate(
        "onnx-int8-static", "onnxruntime", tmp_path,
        container=ContainerSpec("model.onnx", platform="onnxruntime_onnx"),
    )  # fmt: skip
    cfg = parse_config(
        text_format.MessageToString(build_config(spec, shape, int8, "container-gpu"))
    )
    assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert not cfg.optimization.execution_accelerators.gpu_execution_accelerator
