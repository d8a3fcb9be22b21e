"""Integrations with other libraries (imported on demand, never at `import fastcore_ai`)."""
