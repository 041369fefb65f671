-- Every committed change that can alter which CRMs an enterprise has on (or how its tokens
-- resolve) sends NOTIFY integrations_changed, whoever the writer is: our services, the
-- platform's, or plain SQL. NOTIFY is transactional, so listeners only hear committed changes.
-- Payload: {"enterprise_number": "0367", "integration_type": "retailcrm" | "*"}.

CREATE OR REPLACE FUNCTION vochi_notify_integrations_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    changed_key text;
    old_cfg jsonb;
    new_cfg jsonb;
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM pg_notify('integrations_changed',
            json_build_object('enterprise_number', NEW.number, 'integration_type', '*')::text);
        RETURN NULL;
    ELSIF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('integrations_changed',
            json_build_object('enterprise_number', OLD.number, 'integration_type', '*')::text);
        RETURN NULL;
    END IF;

    -- UPDATE
    IF NEW.number IS DISTINCT FROM OLD.number
       OR NEW.active IS DISTINCT FROM OLD.active
       OR NEW.name2 IS DISTINCT FROM OLD.name2
       OR NEW.secret IS DISTINCT FROM OLD.secret THEN
        PERFORM pg_notify('integrations_changed',
            json_build_object('enterprise_number', OLD.number, 'integration_type', '*')::text);
        IF NEW.number IS DISTINCT FROM OLD.number THEN
            PERFORM pg_notify('integrations_changed',
                json_build_object('enterprise_number', NEW.number, 'integration_type', '*')::text);
        END IF;
        RETURN NULL;
    END IF;

    IF NEW.integrations_config IS DISTINCT FROM OLD.integrations_config THEN
        old_cfg := CASE WHEN jsonb_typeof(OLD.integrations_config) = 'object'
                        THEN OLD.integrations_config ELSE '{}'::jsonb END;
        new_cfg := CASE WHEN jsonb_typeof(NEW.integrations_config) = 'object'
                        THEN NEW.integrations_config ELSE '{}'::jsonb END;
        FOR changed_key IN
            SELECT k FROM (
                SELECT jsonb_object_keys(old_cfg) AS k
                UNION
                SELECT jsonb_object_keys(new_cfg)
            ) keys
            WHERE old_cfg -> k IS DISTINCT FROM new_cfg -> k
            ORDER BY k
        LOOP
            PERFORM pg_notify('integrations_changed',
                json_build_object('enterprise_number', NEW.number,
                                  'integration_type', changed_key)::text);
        END LOOP;
    END IF;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS enterprises_integrations_changed ON enterprises;
CREATE TRIGGER enterprises_integrations_changed
    AFTER INSERT OR UPDATE OR DELETE ON enterprises
    FOR EACH ROW EXECUTE FUNCTION vochi_notify_integrations_changed();
