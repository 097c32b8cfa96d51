"""The build side: the one training loop (`loop`), what every Ray Train run needs (`runs`),
`cityserve train` (`trainer`), Ray Tune sweeps (`tune`), the model registry (`registry`),
evaluation reports (`evaluate`) and the settings + registry a command works in (`workspace`).

Modules are imported by name (`from training.registry import Registry`): importing this package
pulls in nothing, so a serving replica that reads the registry never imports Ray Train or Tune.
"""
