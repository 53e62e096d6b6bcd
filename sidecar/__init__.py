"""sidecar: a local reverse proxy that attaches Entra ID bearer tokens to Azure OpenAI requests."""

__version__ = "0.1.0"
