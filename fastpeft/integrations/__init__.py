"""Glue between fastpeft and other libraries' training loops; imported on demand only
(`fastpeft.integrations.transformers`), never by `import fastpeft`."""
