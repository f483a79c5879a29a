"""edgeward's board side: the agent daemon, and the fleet controller that speaks its protocol.

Nothing here imports the converters or any host-only library: a board installs
``edgeward[device]`` and gets only what it needs to verify, load and serve bundles.
"""

__version__ = "0.1.0"
