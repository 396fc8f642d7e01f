"""tlunet's Hydra configuration, installed as the package ``tlunet.conf`` (pyproject.toml maps
``tlunet.conf`` onto this folder): the commands read it through ``pkg://tlunet.conf``, so an
installed wheel finds the same YAML files as a clone."""
