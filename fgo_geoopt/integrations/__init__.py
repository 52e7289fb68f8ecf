"""Integrations with other libraries. :mod:`.timm` imports timm lazily, inside its functions."""
