"""The exact-evaluation testbed: the ToyLang language and exact policy metrics.

`language` defines the synthetic Markov-chain language, its sampler, exact
enumeration and the rule features/rewards (numpy, float64). `exact` computes
divergences, entropies and expectations between conditional policies given as
full log-prob tables over all responses (f-divergences included), and builds
those tables from any autoregressive model with one prefix-sharing forward pass
(jax.numpy). `bon` is the exact Best-of-N of such tables (BOND's evaluation).
"""
