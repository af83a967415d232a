"""Where clients come from: the YAML file or a Supabase table, watched for changes."""
