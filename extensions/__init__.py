"""Beyond the assignment: each module builds on an answer file's classes through the seams that the
answer file shows, and runs on its own (``python -m extensions.<module>``); ``make extensions``
trains their runs into ``results/extensions/``. The answer files never import this package.

- ``extensions.vae_flows``: planar and inverse autoregressive flow posteriors for the VAE, and the
  importance-weighted training bound (question 1.8's gap between the ELBO and log p(x)).
- ``extensions.nf_couplings``: RealNVP's convolutional coupling networks and Flow++'s variational
  dequantization for the flow (question 3.4).
- ``extensions.nf_multiscale``: RealNVP's multi-scale architecture (squeezes, channel couplings,
  factored-out variables) in place of the answer's flow (question 3.4).
"""
