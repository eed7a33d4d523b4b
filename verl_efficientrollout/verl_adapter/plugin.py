"""Imported by veRL itself: ``verl/__init__.py`` loads every ``verl.plugins`` entry point (ours
names this module) in each process that imports verl, i.e. the driver, the trainer workers and
the rollout servers. Importing it registers ``efficient``; that is this module's only purpose.

With ``VERL_USE_EXTERNAL_PLUGINS=none`` set, name it instead:
``VERL_USE_EXTERNAL_MODULES=verl_efficientrollout.verl_adapter.plugin``.
"""

import logging

from verl_efficientrollout.verl_adapter.registry import register

try:
    register()
except Exception as exc:  # verl logs plugin failures at debug level only: say it louder
    logging.getLogger(__name__).warning("verl-efficientrollout: rollout.name=efficient is unavailable: %s", exc)
    raise
