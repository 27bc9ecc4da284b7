"""The runtime: what runs a model with Twilight attention, above ``models`` in the layers.

``generate`` (batched generation), ``sampling`` (the token sampler), ``model_api`` (the model
protocol the runtime takes), ``serving`` (continuous-batching engine and OpenAI-compatible HTTP
server), ``eval`` (the accuracy harness), ``cli`` and ``serve`` (command lines). The core of
``twilight_jax`` (config, cache, selectors, pruner, attention, reference, sharding) never
imports this package. Nothing is imported here, so a submodule loads only what it needs.
"""
