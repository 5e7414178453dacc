"""The errors chatroom raises on purpose. The CLI prints them as one line."""


class ChatroomError(Exception):
    """A problem the user can fix; its message is one clear line."""


class ConfigError(ChatroomError):
    """A setting, option or file named in the config is wrong."""


class PluginError(ChatroomError):
    """A plugin failed to load, or a component name is unknown."""


class InputError(ChatroomError):
    """An input folder or file cannot be used."""


class ResumeError(ChatroomError):
    """An output folder holds a run that this one cannot continue."""


class MissingDependency(ChatroomError):
    """An optional library is not installed; the message names the extra."""

    def __init__(self, library: str, extra: str, component: str = ""):
        who = f"{component} needs " if component else "needs "
        super().__init__(
            f"{who}the '{library}' library: pip install 'chatroom[{extra}]'"
        )


class QuotaExhausted(ChatroomError):
    """A remote service refuses more work (quota, billing): stop, resume later."""
