# SPDX-License-Identifier: Apache-2.0
"""e2e-llm: fine-tune, evaluate and serve LLMs on Ray from one typed configuration."""

__version__ = "0.1.0"
