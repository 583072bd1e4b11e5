"""Configuration: YAML → pydantic schema with file:line errors, --set overrides, the model registry."""
