"""APIs of other tools, mapped onto slimquant."""
