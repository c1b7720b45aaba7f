"""Agent scaffolds."""

from __future__ import annotations

from megaflow.agent.base import Action, Agent, Command, FormatError, Submit, transcript


def make_agent(config) -> Agent:
    """Build the scaffold named by an AgentConfig."""
    kwargs = dict(system_prompt=config.system_prompt, max_observation_chars=config.max_observation_chars)
    if config.type == "oracle":
        from megaflow.agent.oracle import OracleAgent

        return OracleAgent(**kwargs)
    if config.type == "cli":
        from megaflow.agent.cli import CliAgent

        return CliAgent(command=config.command, port=config.port)
    if config.type == "tools":
        from megaflow.agent.tools import ToolAgent

        return ToolAgent(**kwargs)
    if config.type == "computer":
        from megaflow.agent.computer import ComputerAgent

        return ComputerAgent(**kwargs, keep_screenshots=config.keep_screenshots)
    if config.type == "miniswe":
        from megaflow.agent.miniswe import MiniSweAgent

        return MiniSweAgent(**kwargs, config=config.config)
    from megaflow.agent.bash import BashAgent

    return BashAgent(**kwargs)


__all__ = ["Action", "Agent", "Command", "FormatError", "Submit", "make_agent", "transcript"]
