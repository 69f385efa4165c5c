"""Fine-tune jobs: the job process, Ray (cluster, security, workers), the store callback."""
