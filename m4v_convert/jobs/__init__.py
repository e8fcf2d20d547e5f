"""The jobs the commands run: one conversion for every backbone (``convert``, planned by ``plan``,
processes by ``worker``), the synthetic-task ``eval`` and ``ablate``. Jobs reach a backbone only
through its registry entry."""
