"""Finding, converting and loading base models."""
