"""The security team's policy: files read strictly, linted, indexed and hot-reloaded for authorization."""
