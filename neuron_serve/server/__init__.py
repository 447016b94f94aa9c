"""Stage 2 over HTTP: gunicorn, the Flask app, the OpenAI and SageMaker routes, the request protocol."""
