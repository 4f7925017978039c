-- A small application table for the compose stack; a real deployment points the
-- worker at the application's own database instead.
CREATE TABLE IF NOT EXISTS public.notes (
    id bigserial PRIMARY KEY,
    owner_id integer NOT NULL,
    title text NOT NULL,
    body text NOT NULL DEFAULT '',
    status text NOT NULL DEFAULT 'published',
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO public.notes (owner_id, title, body) VALUES
    (1, 'Espresso machine manual', 'descale monthly, 9 bar extraction'),
    (2, 'Coffee brewing notes', 'pour over, 1:16 ratio, 94 degrees');
