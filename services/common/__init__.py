"""Pieces every service shares: settings, database, migrations, the HTTP app core."""
