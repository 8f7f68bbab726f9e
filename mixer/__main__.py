"""``python -m mixer``: the ``mixer`` command."""

from mixer.entry import main

main()
