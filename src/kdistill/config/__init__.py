"""Configs: YAML files read safely (:mod:`.loader`) and the one typed schema that validates every section (:mod:`.schema`)."""
