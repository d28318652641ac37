"""HPM-KD's six components as switches: the ``components`` config section and the config each switch leaves.

A switch that is ``true`` leaves the config as written; ``false`` replaces the component by its plain counterpart,
whatever the pipeline (:data:`SWITCHES`). :func:`effective_config` applies every switch that is off; it is applied
once, when the experiment is planned (:func:`hpmkd.pipelines.plan_experiment`), so every stage, the scheduler and
the Tune search see the same effective config (and it is what the parent run records as params).

=====================  ==================================================================================
switch (``false``)     plain counterpart
=====================  ==================================================================================
``config_manager``     no configuration manager (``config_manager.enabled: false``): the ``distill`` recipe
                       as written
``chain``              direct distillation: no assistants (``chain.assistants: []``)
``attention``          the mean of the teachers' logits (``distill.aggregator: {name: mean_logits}``)
``meta_temperature``   a fixed temperature: ``distill.temperature: {schedule: fixed, T: T0}``, ``T0`` the
                       written schedule's initial ``T`` (4.0 when it has none, e.g. ``cosine``)
``parallel``           sequential scheduling: one stage at a time (``ray.parallel: false``)
``memory``             no reuse: finished stages are recomputed (``reuse: false``) and the configuration
                       manager reads no past runs (``config_manager.memory: false``)
=====================  ==================================================================================

Every replacement is a fixed value, so :func:`effective_config` is idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from hpmkd.config import SECTIONS, ExperimentConfig
from hpmkd.registry import Registry

#: the switches, in the order the ``components`` section lists them
COMPONENTS: tuple[str, ...] = ("config_manager", "chain", "attention", "meta_temperature", "parallel", "memory")

#: the temperature a fixed schedule gets when the written schedule has no initial ``T`` (Hinton et al. 2015)
PUBLISHED_T = 4.0


@SECTIONS.register("components")
@dataclass
class ComponentsConfig:
    """Which of HPM-KD's components run (all ``true``: the config as written); see the module docstring."""

    config_manager: bool = True
    chain: bool = True
    attention: bool = True
    meta_temperature: bool = True
    parallel: bool = True
    memory: bool = True

    def off(self) -> list[str]:
        """The switches that are ``false``, in :data:`COMPONENTS` order."""
        return [name for name in COMPONENTS if not getattr(self, name)]


#: switch name -> the config with that component replaced by its plain counterpart
SWITCHES: Registry[ExperimentConfig] = Registry("component")


@SWITCHES.register("config_manager")
def without_config_manager(cfg: ExperimentConfig) -> ExperimentConfig:
    return cfg.with_section("config_manager", replace(cfg.config_manager, enabled=False))


@SWITCHES.register("chain")
def without_chain(cfg: ExperimentConfig) -> ExperimentConfig:
    return cfg.with_section("chain", replace(cfg.chain, assistants=[]))


@SWITCHES.register("attention")
def without_attention(cfg: ExperimentConfig) -> ExperimentConfig:
    return replace(cfg, distill=replace(cfg.distill, aggregator={"name": "mean_logits"}))


@SWITCHES.register("meta_temperature")
def without_meta_temperature(cfg: ExperimentConfig) -> ExperimentConfig:
    initial = float(cfg.distill.temperature.get("T", PUBLISHED_T))
    return replace(cfg, distill=replace(cfg.distill, temperature={"schedule": "fixed", "T": initial}))


@SWITCHES.register("parallel")
def without_parallel(cfg: ExperimentConfig) -> ExperimentConfig:
    return replace(cfg, ray=replace(cfg.ray, parallel=False))


@SWITCHES.register("memory")
def without_memory(cfg: ExperimentConfig) -> ExperimentConfig:
    return replace(cfg, reuse=False).with_section("config_manager", replace(cfg.config_manager, memory=False))


def effective_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with every component whose switch is ``false`` replaced (module docstring), validated again."""
    off = cfg.components.off()
    if not off:
        return cfg
    for name in off:
        cfg = SWITCHES.get(name, "components")(cfg)
    cfg.config_manager.check_with(cfg)  # a searched key the plain counterpart lacks is reported before anything runs
    return cfg
