"""Device profiles: one YAML file per target device, plus the loader and schema."""
