"""``python -m asib`` runs the same app as the ``asib`` console script."""

from asib.cli import main

if __name__ == "__main__":
    main()
