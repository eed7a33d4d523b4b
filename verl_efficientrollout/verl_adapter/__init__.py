"""veRL integration: ``actor_rollout_ref.rollout.name=efficient`` on stock veRL 0.9.

* ``registry.register()`` puts ``efficient`` into veRL's two rollout registries (explicit,
  idempotent, version-checked). ``plugin`` is the module veRL imports through our
  ``verl.plugins`` entry point in every process that imports verl, so users change one name.
* ``config.efficient_config`` reads ``actor_rollout_ref.rollout.custom.efficient`` once.
* ``server.EfficientServer`` runs the engine behind veRL's token-in/token-out generate API.
* ``rollout.EfficientServerAdapter`` (worker side) and ``rollout.EfficientReplica`` (driver side)
  are the classes veRL looks up by name.

Nothing here is imported by ``import verl_efficientrollout``; verl is an optional extra.
"""
