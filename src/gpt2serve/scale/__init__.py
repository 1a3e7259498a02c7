"""Past one machine, on Ray: `serve --ray` (Ray Serve replicas of the app) and `batch --ray` (Ray Data).

Imported only by the commands given `--ray` (`pip install 'gpt2serve[ray]'`): `import gpt2serve` and a
plain `gpt2serve serve` never import ray.
"""
