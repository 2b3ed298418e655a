-- A new random version on every write to the prompt templates, visible when the write commits: a
-- process keeps the active templates in memory and checks them with the read a dispatch already
-- makes at its start (the registry's selection state), instead of one read per attempt.
CREATE TABLE prompt_templates_version (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version     uuid NOT NULL DEFAULT gen_random_uuid()
);
INSERT INTO prompt_templates_version DEFAULT VALUES;

CREATE FUNCTION bump_prompt_templates_version() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE prompt_templates_version SET version = gen_random_uuid();
    RETURN NULL;
END;
$$;
CREATE TRIGGER prompt_templates_version_bump AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
    ON prompt_templates FOR EACH STATEMENT EXECUTE FUNCTION bump_prompt_templates_version();
