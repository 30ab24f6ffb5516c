# SPDX-License-Identifier: Apache-2.0
"""Thin CLI entrypoints, one module per ``e2e-llm`` subcommand."""
