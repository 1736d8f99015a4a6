"""Integrations with training frameworks.

Each submodule imports its framework when it is itself imported (``fastdpo.integrations.trl``
needs ``trl``; ``fastdpo.integrations.hf`` uses only ``transformers`` conventions), never here, so
``import fastdpo`` works without any of them installed.
"""
