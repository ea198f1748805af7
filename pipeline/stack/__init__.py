"""Infrastructure: the team's shared services started on one machine (`services`), and the DVC remote that
carries data between checkouts (`remote`)."""
