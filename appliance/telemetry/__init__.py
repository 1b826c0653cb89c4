"""Request telemetry: schema (its own migration set), a background writer, and queries."""
