"""The jobs the commands run: one conversion (``convert``, planned by ``plan``), with eval and
ablate still in :mod:`m4v_convert.eval`. Jobs reach a backbone only through its registry entry."""
