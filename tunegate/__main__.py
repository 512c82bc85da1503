from tunegate.cli import app

app()
