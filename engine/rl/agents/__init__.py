"""Multi-turn agent rollouts: environments between the model's turns, token-in, token-out.

``config`` (the flags), ``executor`` (trajectories over any generator of token ids),
``turns`` (many trajectories' turns batched onto a pool of engines), ``render`` (environment
messages to token ids), ``openrlhf`` (OpenRLHF's ``--agent_func_path`` files), ``rollouts`` (the
RL loop's ``RolloutEngines`` that runs them). Nothing here imports Ray: the pool is handed in.
"""
