"""Builds the Spanish customer-service intent set data/intents_es/{train,validation,test}.jsonl.

    python scripts/build_intents_data.py [OUT_DIR] [--seed N]   # default data/intents_es, seed 0

Every message comes from the hand-written templates and slot values below (written for kerasft in
December 2026; nothing copied from a public dataset). Each intent has templates in several
registers (formal "usted", informal "tú", Rioplatense "vos"), regional vocabulary (Spain, Mexico,
Argentina, Colombia), short and long forms, and optional greetings and sign-offs; about one message
in five gets one or two keyboard typos (a dropped, doubled or swapped letter, a lost accent).
The same seed gives byte-identical files. Messages are de-duplicated, then split per intent
70/15/15 into train / validation / test, so every split keeps the class balance.

One JSON object a line: {"id": "intent-0001", "text": message, "intent": label}.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PER_INTENT = 60
SPLITS = (("train", 0.70), ("validation", 0.15), ("test", 0.15))

# The label set, in report order. Labels are short Spanish nouns so the model generates few tokens.
INTENTS = ("facturación", "baja", "envío", "avería", "dirección", "devolución", "horario")

SLOTS = {
    "importe": ["12,99 €", "45 euros", "30 €", "$1.250", "89,90 euros", "$399", "el doble de lo normal", "unos 20 euros de más",
                "150 pesos", "27,50 €"],
    "mes": ["enero", "febrero", "marzo", "abril", "mayo", "junio", "julio", "agosto", "septiembre", "octubre",
            "noviembre", "diciembre", "este mes", "el mes pasado"],
    "servicio": ["la fibra", "el plan de datos", "la suscripción", "el seguro del móvil", "la línea fija", "el paquete de TV",
                 "el plan familiar", "la cuenta premium", "el internet", "la línea del celular"],
    # "|a" gives the agreement the motives take: {o} -> o/a/os/as, {n} -> n for plurals and
    # <singular/plural> verb forms (la cafetera llegó rota, los auriculares llegaron rotos).
    "producto": ["la cafetera|a", "las zapatillas|as", "el pedido de libros|o", "la chaqueta|a", "el móvil|o",
                 "los auriculares|os", "la licuadora|a", "el paquete|o", "la silla de oficina|a", "el teclado|o",
                 "las camisetas|as", "la tablet|a", "el colchón|o", "el celular|o", "la mochila|a"],
    "pedido": ["4471", "A-20931", "88120", "#55302", "ES-7781", "3390-B", "102938", "MX-4410", "7754", "PED-6612"],
    "dias": ["tres días", "una semana", "diez días", "dos semanas", "5 días", "más de un mes", "48 horas", "quince días"],
    "aparato": ["el router", "el decodificador", "la televisión", "el wifi", "el teléfono fijo", "la app", "el módem",
                "la conexión", "el internet", "la fibra", "el modem", "la señal del celular"],
    "fallo": ["no funciona", "se corta cada rato", "no enciende", "parpadea en rojo", "va lentísimo", "no tiene señal",
              "se reinicia solo", "da error al conectar", "no carga", "hace un ruido raro", "dejó de andar",
              "no responde"],
    "calle": ["calle Mayor 14, 3ºB", "avenida Reforma 220, depto 5", "Av. Corrientes 1534, 2do piso",
              "carrera 7 # 45-12", "calle de la Luna 8", "paseo de Gracia 51", "calle Hidalgo 33, colonia Centro",
              "pasaje Los Andes 910", "plaza del Sol 2, bajo", "avenida Libertador 4500"],
    "ciudad": ["Madrid", "Sevilla", "Guadalajara", "Córdoba", "Bogotá", "Valencia", "Monterrey", "Rosario", "Bilbao",
               "Medellín", "Zaragoza", "Puebla", "Mendoza", "Málaga"],
    "dia": ["el sábado", "los domingos", "mañana", "el lunes festivo", "en Semana Santa", "el 24 de diciembre",
            "los fines de semana", "hoy", "el puente de mayo", "por la noche", "el 1 de enero", "en agosto"],
    "tienda": ["la tienda del centro", "la oficina de Gran Vía", "la sucursal de Polanco", "el local de Palermo",
               "la tienda del centro comercial", "la oficina de atención", "el punto de recogida", "la sucursal de Chapinero",
               "la tienda de la estación", "el mostrador"],
    "motivo": ["me queda{n} chic{o}", "<llegó/llegaron> rot{o}", "no es lo que pedí", "<vino/vinieron> con un defecto",
               "no me <gustó/gustaron>", "la talla no es la correcta", "el color es distinto al de la foto", "<llegó/llegaron> abollad{o}",
               "ya no l{o} necesito", "<vino/vinieron> incomplet{o}"],
    "competidor": ["otra compañía", "la competencia", "otro operador", "una oferta mejor", "otra empresa más barata"],
}

TEMPLATES = {
    "facturación": [
        "Me han cobrado {importe} en la factura de {mes} y no sé por qué",
        "¿Por qué mi factura de {mes} es tan alta?",
        "buenas, en el recibo de {mes} aparece un cargo de {importe} que no reconozco",
        "Quisiera solicitar una copia de la factura de {mes}, por favor",
        "me cobraron dos veces {servicio} este mes, necesito que me devuelvan la plata",
        "Oye, ¿me explicas este cargo de {importe}? No contraté nada nuevo",
        "No entiendo el desglose del recibo, sale {importe} de más",
        "che, me vino la factura con {importe} y yo tengo tarifa plana, ¿qué onda?",
        "Estimados: detecto un cobro indebido de {importe} correspondiente a {servicio}. Solicito su revisión y el reembolso",
        "cómo cambio la forma de pago de {servicio}? quiero pagar con tarjeta y no por domiciliación",
        "Necesito la factura con mis datos fiscales para {mes}",
        "el cargo de {servicio} subió sin avisar, ahora pago {importe}",
        "factura de {mes} mal",
        "¿Me pueden decir cuándo vence el pago de {mes}? No quiero que me cobren recargo",
        "Ayer me llegó un cobro de {importe} a la tarjeta y no he comprado nada, ¿qué es?",
        "Hola, quería saber por qué me han cobrado {servicio} si lo di de baja hace meses, me aparece otra vez {importe} en la factura",
        "vos sabés por qué me descontaron {importe} de la cuenta? no me cierra el monto",
        "Quiero checar mi estado de cuenta, creo que me cobraron {importe} de más",
    ],
    "baja": [
        "Quiero dar de baja {servicio}",
        "¿Cómo cancelo mi suscripción? No la uso",
        "Deseo cancelar {servicio} a partir de {mes}",
        "me voy a {competidor}, ¿qué tengo que hacer para darme de baja?",
        "Buenas tardes, solicito la baja definitiva de {servicio} y de todos mis datos",
        "cancelen mi cuenta ya por favor",
        "No quiero seguir con ustedes, tramitad la baja de {servicio}",
        "¿Tiene penalización cancelar {servicio} antes de tiempo?",
        "quiero rescindir el contrato, me cambio a {competidor}",
        "hola! cómo hago para desuscribirme? ya no quiero pagar más",
        "Por favor, procedan a cancelar {servicio}; no deseo renovarlo",
        "che, quiero cancelar todo, ¿dónde se hace la baja?",
        "baja de {servicio}",
        "Llevo años con ustedes pero encontré {competidor} y quiero irme, díganme los pasos para la cancelación",
        "Quisiera anular mi contrato de {servicio} sin que me cobren otro mes",
        "¿Puedo cancelar por aquí o tengo que llamar? Quiero dar de baja la cuenta",
        "neta ya no quiero el servicio, cancélenlo",
        "dejen de renovarme {servicio}, quiero terminar el contrato",
    ],
    "envío": [
        "¿Dónde está mi pedido {pedido}?",
        "Hice un pedido hace {dias} y todavía no ha llegado",
        "¿Cuándo llega{n} {producto}? Pedido {pedido}",
        "el seguimiento del pedido {pedido} no se mueve desde hace {dias}",
        "Buenos días, quisiera saber el estado de envío del pedido {pedido}",
        "compré {producto} y no me ha llegado nada, ya pasaron {dias}",
        "¿Ya salió mi paquete? Es el {pedido}",
        "oigan, ¿por dónde anda mi pedido? lo necesito para el finde",
        "el repartidor no vino y el pedido {pedido} aparece como entregado",
        "me pueden dar el número de seguimiento de {producto}?",
        "Llevo {dias} esperando {producto}, ¿qué pasa con el envío?",
        "pedido {pedido} sin noticias",
        "Estimados, el pedido {pedido} debía entregarse hace {dias}. Les agradecería información sobre su paradero",
        "¿Cuánto tarda en llegar un envío a {ciudad}?",
        "che, el paquete {pedido} sigue en camino hace {dias}, ¿lo perdieron?",
        "quiero saber si {producto} ya está en reparto, tengo que salir",
        "El pedido {pedido} dice 'en tránsito' desde hace {dias}, ¿es normal?",
        "a qué hora pasa el mensajero con mi pedido?",
    ],
    "avería": [
        "{aparato} {fallo}",
        "Desde ayer {aparato} {fallo}, ¿pueden revisarlo?",
        "Tengo un problema técnico: {aparato} {fallo}",
        "Hola, {aparato} {fallo} desde esta mañana y trabajo desde casa, necesito una solución urgente",
        "ya reinicié {aparato} tres veces y sigue igual, {fallo}",
        "no tengo internet en casa desde hace {dias}",
        "¿Hay alguna avería en {ciudad}? {aparato} {fallo}",
        "Buenas, les escribo porque {aparato} {fallo}. Ya probé a desconectarlo y nada",
        "el técnico vino y {aparato} sigue sin andar",
        "mi {aparato2} {fallo}, qué hago??",
        "Solicito asistencia técnica: {aparato} {fallo} de forma intermitente",
        "vos podés mandar a alguien? {aparato} {fallo} hace {dias}",
        "{aparato} {fallo} y no puedo ver nada, ayuda",
        "Me sale una luz roja en el router y no hay conexión",
        "se me cae la conexión cada cinco minutos, es imposible trabajar así",
        "oye, {aparato} {fallo} otra vez, ya es la tercera vez este mes",
        "Desde la actualización de ayer la app {fallo}",
        "Reporto una falla: {aparato} {fallo}",
    ],
    "dirección": [
        "Quiero cambiar la dirección de envío a {calle}, {ciudad}",
        "Me he mudado, mi nueva dirección es {calle}",
        "¿Cómo actualizo mi domicilio? Ahora vivo en {ciudad}",
        "Por favor, modifiquen la dirección de facturación: {calle}, {ciudad}",
        "me equivoqué de dirección en el pedido {pedido}, la buena es {calle}",
        "cambio de domicilio a {calle}",
        "Buenas, ¿puedo cambiar la dirección de entrega del pedido {pedido} aunque ya esté pagado?",
        "nos mudamos a {ciudad} el mes que viene, ¿cómo cambio la dirección de la cuenta?",
        "Estimados, les comunico mi nuevo domicilio a efectos de correspondencia: {calle}, {ciudad}",
        "che, mandame el pedido a {calle} en vez de a la dirección vieja",
        "hay que corregir el número del portal en mi dirección, es {calle}",
        "quiero que el paquete {pedido} llegue a mi trabajo, {calle}, no a mi casa",
        "actualizar dirección: {calle}, {ciudad}",
        "¿Dónde cambio la dirección que tengo guardada en mi perfil?",
        "Me cambié de casa y quiero que {servicio} siga funcionando en {calle}",
        "puse mal el código postal en mi dirección, ¿lo pueden arreglar?",
        "Ya no vivo en {ciudad}, necesito poner la dirección nueva: {calle}",
        "cambien la dirección del pedido {pedido} x favor",
    ],
    "devolución": [
        "Quiero devolver {producto} porque {motivo}",
        "¿Cómo hago una devolución? {producto} {motivo2}",
        "Me gustaría devolver {producto} del pedido {pedido} y que me reembolsen el dinero",
        "{producto} {motivo2}, ¿l{o} puedo cambiar por otr{o}?",
        "devolución del pedido {pedido}, {motivo}",
        "Buenas, compré {producto} hace {dias} y {motivo}. ¿Todavía estoy a tiempo de devolverl{o}?",
        "¿Cuánto tarda el reembolso de una devolución?",
        "necesito la etiqueta para devolver {producto}",
        "Solicito la devolución de {producto}, ya que {motivo}. Adjunto el número de pedido {pedido}",
        "che, quiero devolver {producto}, {motivo}, cómo es el trámite?",
        "¿Puedo devolver {producto} en {tienda} o tengo que mandarl{o} por correo?",
        "ya mandé la devolución de {producto} hace {dias} y no me devuelven la plata",
        "quiero cambiar {producto} por una talla más grande",
        "{producto} {motivo2}, quiero mi dinero de vuelta",
        "¿La devolución es gratis o tengo que pagar yo el envío?",
        "Hola! {producto} {motivo2} así que l{o} quiero regresar",
        "oigan, {motivo}, ¿me aceptan la devolución aunque abrí la caja?",
        "pedido {pedido}: quiero devolverlo",
    ],
    "horario": [
        "¿A qué hora abren {tienda}?",
        "¿Qué horario tienen {dia}?",
        "¿Abren {dia}?",
        "Buenas, ¿hasta qué hora está abierta {tienda}?",
        "¿Cuál es el horario de atención al cliente por teléfono?",
        "hola, ¿{tienda} abre {dia} o está cerrada?",
        "horario de {tienda}",
        "Quisiera saber el horario de apertura de {tienda} {dia}, por favor",
        "¿A qué hora cierran hoy? Quiero pasar a recoger un pedido",
        "che, ¿a qué hora abre {tienda} {dia}?",
        "¿El servicio de atención está disponible las 24 horas?",
        "¿Atienden al mediodía o cierran para comer?",
        "Estimados, ¿podrían indicarme el horario de {tienda} durante {dia2}?",
        "q horario tienen {dia}??",
        "¿Hasta qué hora puedo llamar para hablar con una persona?",
        "¿Abrís {dia}? Necesito pasar por {tienda} sí o sí",
        "¿A partir de qué hora puedo pasar por {tienda}?",
        "quería saber si abren {dia} porque trabajo entre semana",
    ],
}

# Slots that need a different grammatical form of the same values.
DERIVED = {
    "aparato2": ["router", "módem", "decodificador", "celular", "teléfono", "tele", "wifi"],
    "motivo2": ["<llegó/llegaron> rot{o}", "no funciona{n}", "<vino/vinieron> defectuos{o}", "no me queda{n} bien", "<es/son> de otro color",
                "<llegó/llegaron> incomplet{o}", "no <es/son> como en la foto"],
    "dia2": ["las fiestas", "el verano", "Navidad", "agosto", "Semana Santa"],
}

GREETINGS = {
    "formal": ["Buenos días. ", "Buenas tardes. ", "Estimados señores: ", "Hola, buenas tardes. ", "Disculpen, "],
    "informal": ["hola ", "Hola! ", "buenas, ", "oye, ", "ey ", "Holaa, ", "che, ", "qué tal, "],
}
CLOSINGS = {
    "formal": [" Muchas gracias.", " Un saludo.", " Quedo a la espera de su respuesta.", " Atentamente, Marta.",
               " Gracias de antemano."],
    "informal": [" gracias!", " grax", " porfa", " xfa", " saludos", " gracias 🙏", " es urgente!!", " vale gracias",
                 " dale, gracias"],
}

# Keyboard neighbours for typos (QWERTY, Spanish layout).
NEIGHBOURS = {"a": "sq", "e": "wr", "i": "uo", "o": "ip", "s": "ad", "n": "bm", "r": "et", "t": "ry", "l": "kñ",
              "c": "xv", "d": "sf", "m": "n", "u": "yi", "p": "o"}


def strip_accents(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")


def add_typo(text: str, rng: random.Random) -> str:
    """One typo: a dropped, doubled, swapped or neighbouring letter, or all accents lost."""
    kind = rng.choice(("drop", "double", "swap", "neighbour", "accents"))
    if kind == "accents":
        return "".join(c if c in "ñÑ" else strip_accents(c) for c in text)
    letters = [i for i, c in enumerate(text) if c.isalpha()]
    if len(letters) < 4:
        return text
    i = rng.choice(letters[1:-1])
    if kind == "drop":
        return text[:i] + text[i + 1:]
    if kind == "double":
        return text[:i] + text[i] + text[i:]
    if kind == "swap" and text[i + 1:i + 2].isalpha():
        return text[:i] + text[i + 1] + text[i] + text[i + 2:]
    if text[i].lower() in NEIGHBOURS:
        return text[:i] + rng.choice(NEIGHBOURS[text[i].lower()]) + text[i + 1:]
    return text


def fill(template: str, rng: random.Random) -> str:
    """The template with every {slot} replaced by a random value; motives agree in gender and
    number with the product ({o} -> o/a/os/as, {n} -> n, <llegó/llegaron>), "a el" / "de el" contract."""
    ending = "o"

    def value(match):
        nonlocal ending
        name = match.group(1)
        if name in ("o", "n"):  # agreement marks, filled once the product is known
            return match.group(0)
        chosen = rng.choice(SLOTS.get(name) or DERIVED[name])
        if name == "producto":
            chosen, ending = chosen.split("|")
        return chosen

    text = re.sub(r"\{(\w+)\}", value, template)
    plural = ending.endswith("s")
    text = text.replace("{o}", ending).replace("{n}", "n" if plural else "")
    text = re.sub(r"<([^<>/]+)/([^<>/]+)>", lambda m: m.group(2 if plural else 1), text)
    return re.sub(r"\b(a|de) el\b", lambda m: "al" if m.group(1) == "a" else "del", text)


def message(intent: str, rng: random.Random) -> str:
    """One message of an intent: a filled template, maybe a greeting and a sign-off in a matching
    register, maybe lowercased (chat style), maybe with typos."""
    text = fill(rng.choice(TEMPLATES[intent]), rng)
    register = "informal" if text[:1].islower() or rng.random() < 0.4 else "formal"
    opens_with_greeting = text.lower().startswith(("hola", "buen", "estimad", "che", "oye", "oigan"))
    if rng.random() < 0.35 and not opens_with_greeting:
        greeting = rng.choice(GREETINGS[register])
        if greeting.rstrip().endswith(","):  # "Disculpen, ¿cómo..." goes on in lower case
            text = re.sub(r"^(¿?)(\w)", lambda m: m.group(1) + m.group(2).lower(), text)
        text = greeting + text
    if rng.random() < 0.3:
        text = text.rstrip(".") + ("." if register == "formal" and text[-1:] not in "?!." else "") + rng.choice(
            CLOSINGS[register])
    if register == "informal" and rng.random() < 0.3:
        text = text.lower()
    for _ in range(rng.choice((0, 0, 0, 0, 1, 2)) if len(text) > 20 else 0):
        text = add_typo(text, rng)
    return " ".join(text.split())


def build(seed: int) -> dict[str, list[dict]]:
    """The three splits, each a list of {"id", "text", "intent"}; deterministic in seed."""
    rng = random.Random(seed)
    splits = {name: [] for name, _ in SPLITS}
    seen = set()
    for intent in INTENTS:
        texts = []
        tries = 0
        while len(texts) < PER_INTENT:
            tries += 1
            if tries > 100 * PER_INTENT:
                raise SystemExit(f"{intent}: only {len(texts)} distinct messages; add templates or slot values")
            text = message(intent, rng)
            key = strip_accents(text.lower())
            if key not in seen:
                seen.add(key)
                texts.append(text)
        start = 0
        for n, (name, share) in enumerate(SPLITS):
            end = PER_INTENT if n == len(SPLITS) - 1 else start + round(share * PER_INTENT)
            splits[name] += [{"text": text, "intent": intent} for text in texts[start:end]]
            start = end
    number = 0
    for name, _ in SPLITS:
        rng.shuffle(splits[name])
        for row in splits[name]:
            number += 1
            row["id"] = f"intent-{number:04d}"
    return {name: [{"id": r["id"], "text": r["text"], "intent": r["intent"]} for r in rows]
            for name, rows in splits.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default=str(ROOT / "data" / "intents_es"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in build(args.seed).items():
        path = out / f"{name}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(path)
        counts = {intent: sum(r["intent"] == intent for r in rows) for intent in INTENTS}
        print(f"{path}: {len(rows)} messages {counts}")


if __name__ == "__main__":
    main()
