"""The error of a config problem a user can fix. Its own module: the config and the sections' parsers
it calls (the augmentation spec) both raise it."""


class ConfigError(ValueError):
    """A config problem a user can fix; the message names the key and the fix."""
